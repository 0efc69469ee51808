"""Layout-agnostic training checkpoints, written by every rank in parallel, and the Hugging Face export.

Each rank writes what it alone holds, so no rank gathers the model and the save takes the time of one rank's
share; any (tensor, pipeline, data, ZeRO) layout resumes from it:

    step_0000010/
      rank-00000-of-00008.safetensors   per rank: for each tensor its pipeline stage owns, the flat range of its
        ...                              tensor-parallel shard that no data-parallel replica also writes (its ZeRO
                                         partition, else an even share), under 'model/<HF name>', 'exp_avg/<name>',
                                         'exp_avg_sq/<name>' and, in bf16/fp16, 'master/<name>' (fp32 masters);
                                         where each piece lies in the full tensor is in the file's metadata
                                         (``checkpoint_pieces.Piece``); and the rank's RNG states
      index.json                         every piece of every tensor (the metadata of all rank files)
      trainer_state.json                 step, samples consumed, AdamW step count, skipped steps, LR schedule,
                                         loss scaler, the layout that wrote it
      config.json, tokenizer files, run_config.yaml
      manifest.json                      size and SHA-256 of every file above, written last

Every rank streams its file into the staging directory and fsyncs it; once all have (the only wait), rank 0
writes the index and the rest and commits (``checkpoint_files``: manifest, rename). Loading verifies the
manifest, gives each rank's parameters their values from the saved pieces that overlap its shards
(``CheckpointWeights``, before the model exists in memory) and after DeepSpeed is set up the optimizer state
the same way (``restore``). Nothing is pickled. Checkpoints of format 1 (one gathered ``model.safetensors``
and ``optimizer.safetensors``) still load. ``python -m training.export`` turns any of them into an HF
directory.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open

from modeling.materialize import give_value
from modeling.parallelize import full_shape, shards
from modeling.parallelize import full_tensor as merge_tensor
from parallel.comm import comm_device
from training import background_save, hf_files, optimizer_state
from training import checkpoint_files as files
from training.checkpoint_files import CheckpointError, tag_for
from training.checkpoint_pieces import INDEX, CheckpointReader, Piece
from training.hf_files import write_safetensors
from training.rank0 import on_every_rank, on_rank0

__all__ = ["CheckpointError", "checkpoint_root", "tag_for", "resolve_resume", "save", "check_weights",
           "CheckpointWeights", "restore", "export_hf", "TrainerState"]


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


@dataclass(frozen=True)
class TrainerState:
    """What a resumed run continues from."""

    step: int
    consumed_samples: int
    skipped_steps: int


# ------------------------------------------------------------------------------------------- resolving

def resolve_resume(resume: str | None, output_dir: str | Path, share: tuple[int, int] = (0, 1)) -> Path | None:
    """``train.resume`` -> the checkpoint directory to load, verified, or None to start fresh.
    'auto' takes the newest complete checkpoint in ``output_dir`` (incomplete saves are skipped); a path
    may be a checkpoint directory, or a ``checkpoints`` root / run directory (its newest complete one).
    ``share``: the part of the files' SHA-256 checks done here (``checkpoint_files.verify``)."""
    if resume is None:
        return None
    if resume == "auto":
        found = files.newest_complete(checkpoint_root(output_dir))
    else:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"train.resume={resume}: no such checkpoint directory; use 'auto' or a path "
                                    f"like {checkpoint_root(output_dir) / tag_for(100)}")
        found = path if files.step_of(path) is not None else (
            files.newest_complete(path) or files.newest_complete(checkpoint_root(path)))
        if found is None:
            raise CheckpointError(f"train.resume={resume}: no complete checkpoint (step_* directory with a "
                                  f"{files.MANIFEST}) there")
    if found is not None:
        files.verify(found, share)
    return found


def agree_on_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``resolve_resume`` on rank 0, the answer shared with every rank, and every rank checked to see it: a rank
    resuming while another starts fresh would hang the job later. The ranks split the files' SHA-256 checks."""
    share = (dist.get_rank(), dist.get_world_size())
    found = on_rank0(lambda: resolve_resume(resume, output_dir, share), "finding the checkpoint to resume from")
    shared = [str(found) if found is not None else None]
    dist.broadcast_object_list(shared, src=0)
    chosen = Path(shared[0]) if shared[0] is not None else None
    unseen = torch.tensor([0.0 if chosen is None or (chosen / files.MANIFEST).is_file() else 1.0],
                          device=comm_device())
    dist.all_reduce(unseen, op=dist.ReduceOp.MAX)
    if unseen.item():
        raise CheckpointError(f"train.resume: rank 0 resumes from {chosen}, which is not readable on every rank; "
                              f"train.output_dir (or the checkpoint path) must be on a filesystem all nodes share")
    if chosen is not None:
        on_every_rank(lambda: dist.get_rank() == 0 or files.verify(chosen, share), f"verifying {chosen}")
    return chosen


def existing_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoint_root(output_dir)
    return next((p for p in sorted(root.glob("step_*"))), None) if root.is_dir() else None


# ------------------------------------------------------------------------------------------ what a rank holds

def _canonical_names(model) -> list[str]:
    """State-dict keys with each tied parameter once (under its first name), as ``save_pretrained`` does."""
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return [name for name in model.state_dict() if name not in aliases]


def _local_params(engine, model, groups) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters by every HF name they have (a pipeline stage holds only its own)."""
    everything = dict(model.named_parameters(remove_duplicate=False))
    if groups.pipeline == 1:
        return everything
    held = {id(p) for p in engine.module.parameters()}
    return {name: p for name, p in everything.items() if id(p) in held}


def _trainable(engine, model, groups) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters that the optimizer updates (frozen ones, e.g. Marian's sinusoidal positions,
    have no optimizer state)."""
    return {name: p for name, p in _local_params(engine, model, groups).items() if p.requires_grad}


def _local_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(tensor, "ds_shape", tensor.shape))  # ZeRO-3 keeps the unpartitioned shape there


def _holdings(engine, model, groups):
    """(this rank's tensors by canonical HF name, the pipeline stage that owns each name, name -> (full shape,
    dtype) in state-dict order). A tied weight held by several stages is owned by the lowest. Collective: a
    small exchange of names and shapes."""
    names = _canonical_names(model)
    local = {**{n: b for n, b in model.named_buffers() if groups.is_first_stage},
             **_local_params(engine, model, groups)}
    local = {n: t for n, t in local.items() if n in set(names)}
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, (groups.pp_rank, {n: (full_shape(model, n, t), t.dtype) for n, t in local.items()}))
    owner, spec = {}, {}
    for stage, specs in sorted(held, key=lambda h: h[0]):
        for name, shape_dtype in specs.items():
            owner.setdefault(name, stage)
            spec.setdefault(name, shape_dtype)
    missing = [n for n in names if n not in spec]
    if missing:
        raise RuntimeError(f"no rank holds {missing}")
    return local, owner, {n: spec[n] for n in names}


def _rng_state(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This rank's generators: torch's (and the tensor-parallel dropout generator's) as tensors, Python's and
    NumPy's as JSON."""
    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    if getattr(model, "tensor_parallel_rng", None) is not None:
        tensors["rng/tensor_parallel"] = model.tensor_parallel_rng.state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/torch_cuda"] = torch.cuda.get_rng_state()
    numpy_state = [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()]
    return tensors, {"rng/python": json.dumps(random.getstate()), "rng/numpy": json.dumps(numpy_state)}


def _loss_scaler_state(engine) -> dict[str, float]:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    keys = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
    return {k: float(getattr(scaler, k)) for k in keys if scaler is not None and hasattr(scaler, k)}


# ----------------------------------------------------------------------------------------------- saving

def rank_file(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


def save(engine, model, tokenizer, groups, run_config: dict[str, Any], step: int, consumed_samples: int,
         output_dir: str | Path, background=None, timeout_s: float = 1800.0) -> Path:
    """Write the checkpoint of ``step``; collective over all ranks. Every rank writes its own file in
    parallel; rank 0 then indexes them and commits. Returns its directory on every rank.
    With ``background`` (a ``BackgroundSave``, for ``train.async_save``) the save in flight is waited for,
    this rank's part is copied to host memory, and a thread writes it while training goes on; rank 0's thread
    commits once every rank's file is written (or fails after ``timeout_s``); the directory is complete only
    after ``background.wait()``."""
    if background is not None:
        background.wait()  # at most one save in flight
    root = checkpoint_root(output_dir)
    precision = run_config.get("precision", "fp32")
    kinds = ("model",) + optimizer_state.MOMENTS + (("master",) if precision != "fp32" else ())
    local, owner, _ = _holdings(engine, model, groups)
    on_rank0(lambda: files.begin(root, step), f"starting the checkpoint of step {step}")
    staging = files.staging_dir(root, step)
    trainer = copy.deepcopy(_trainer_state(engine, groups, step, consumed_samples, precision))  # as of now

    def finish(written: dict[str, dict]) -> Path:
        return _commit(staging, model, tokenizer, run_config, trainer, step, written)

    def rank_values():
        return _rank_values(engine, model, groups, kinds, local, owner)

    if background is None:
        written = on_every_rank(lambda: _write_rank_file(staging, *rank_values()), f"writing the checkpoint of step {step}")
        on_rank0(lambda: finish(dict(written)), f"saving the checkpoint of step {step}")
    else:
        pieces = {}
        on_every_rank(lambda: pieces.update(snapshot=_host_copy(*rank_values())),
                      f"copying the checkpoint of step {step} to host memory")
        background.start(step, lambda: _write_in_background(staging, pieces["snapshot"], finish, timeout_s))
    return root / tag_for(step)  # on every rank: each must know the save happened


def _trainer_state(engine, groups, step: int, consumed_samples: int, precision: str) -> dict[str, Any]:
    return {
        "step": step, "consumed_samples": consumed_samples,
        "optimizer_steps": optimizer_state.optimizer_steps(engine),
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "loss_scaler": _loss_scaler_state(engine),
        "layout": {"tensor": groups.tensor, "pipeline": groups.pipeline, "data": groups.data,
                   "world_size": dist.get_world_size(), "zero_stage": engine.zero_optimization_stage(),
                   "precision": precision},
    }


def _commit(staging: Path, model, tokenizer, run_config, trainer, step: int, written: dict[str, dict]) -> Path:
    """Rank 0, once every rank's file is written: the index, the trainer state and the run files, then
    ``files.commit`` (manifest, rename)."""
    index = _index(staging, _canonical_names(model), trainer["layout"]["world_size"])
    files.write_text_atomic(staging / INDEX, json.dumps(index, indent=None))
    files.write_text_atomic(staging / "trainer_state.json", json.dumps(trainer, indent=1))
    files.write_text_atomic(staging / "run_config.yaml", yaml.safe_dump(run_config, sort_keys=False))
    files.write_atomic(staging / "config.json", lambda tmp: model.config.to_json_file(str(tmp)))
    tokenizer.save_pretrained(str(staging))
    return files.commit(staging, step, written)


def _rank_values(engine, model, groups, kinds, local, owner) -> tuple[str, dict, dict]:
    """(this rank's file name, its tensors by key, its metadata): for each tensor its stage owns
    (tensor-parallel rank 0 for one they all hold whole), the part no data-parallel replica also writes
    (``optimizer_state.owned_part``, views of the live state), described by a ``Piece`` in the metadata;
    and the rank's RNG states."""
    file = rank_file(dist.get_rank(), dist.get_world_size())
    layout = shards(model, groups.tp_group)
    values, metadata = _rng_state(model)
    for name, tensor in local.items():
        if owner[name] != groups.pp_rank or (layout[name].dim is None and groups.tp_rank != 0):
            continue  # another stage's tied copy, or a copy every tensor-parallel rank holds: written once
        for kind in kinds if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad else ("model",):
            part = optimizer_state.owned_part(engine, tensor, kind, groups.dp_rank, groups.data)
            if part is None:
                continue
            start, values[f"{kind}/{name}"] = part
            metadata[f"{kind}/{name}"] = json.dumps(Piece(
                file, f"{kind}/{name}", start, part[1].numel(), _local_shape(tensor), full_shape(model, name, tensor),
                layout[name], hf_files.dtype_name(part[1].dtype)).describe())
    return file, values, metadata


def _host_copy(file: str, values: dict, metadata: dict) -> tuple[str, dict, dict]:
    """The rank's part copied to host memory, so training may change the live state while it is written."""
    return file, {key: value.detach().to("cpu", copy=True) for key, value in values.items()}, metadata


def _write_rank_file(staging: Path, file: str, values: dict, metadata: dict) -> tuple[str, dict]:
    """This rank's file, streamed tensor by tensor and fsynced (``files.write_atomic``); returns its name and
    manifest entry."""
    specs = {key: (tuple(v.shape), v.dtype) for key, v in values.items()}
    files.write_atomic(staging / file, lambda tmp: write_safetensors(tmp, specs, values.__getitem__, metadata))
    return file, files.describe_file(staging / file)  # hashed here, in parallel, not by rank 0 for all


def _write_in_background(staging: Path, snapshot, finish, timeout_s: float) -> None:
    """A ``BackgroundSave`` thread: write this rank's file and report it; rank 0 then commits once every rank
    has. No collectives: the step loop's own run meanwhile."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        background_save.report_written(staging, rank, *_write_rank_file(staging, *snapshot))
    except BaseException as exc:
        background_save.report_failed(staging, rank, exc)
        raise
    if rank == 0:
        finish(background_save.await_ranks(staging, world, timeout_s))


def _index(staging: Path, names: list[str], world: int) -> dict[str, Any]:
    """Rank 0: every piece of every tensor, from the rank files' metadata, keys in state-dict order."""
    found: dict[str, list[dict]] = {}
    for rank in range(world):
        with safe_open(str(staging / rank_file(rank, world)), framework="pt") as handle:
            for key, text in (handle.metadata() or {}).items():
                if not key.startswith("rng/"):
                    found.setdefault(key, []).append(json.loads(text))
    missing = [n for n in names if f"model/{n}" not in found]
    if missing:
        raise RuntimeError(f"no rank wrote {missing[:5]}")
    order = {name: i for i, name in enumerate(names)}
    keys = sorted(found, key=lambda k: (order.get(k.partition("/")[2], len(order)), k))
    return {"format": files.FORMAT, "world_size": world, "tensors": {k: found[k] for k in keys}}


# ---------------------------------------------------------------------------------------------- loading

def check_weights(model, path: Path) -> None:
    """A checkpoint of another model (names or shapes differ from ``model``'s, which may be on the meta device)
    is an error naming them, before anything is read."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name in set(_canonical_names(model))}
    saved = CheckpointReader(path).names("model")
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = [f"{n}: {saved[n]} in the checkpoint, {expected[n]} in this model"
                for n in expected if n in saved and saved[n] != expected[n]]
    if missing or unexpected or reshaped:
        details = "; ".join(filter(None, [
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
            f"not in this model {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "",
            "shapes differ: " + ", ".join(reshaped[:5]) if reshaped else ""]))
        raise CheckpointError(f"train.resume: {path} holds a different model than this run builds ({details}); "
                              f"use the model.* settings of the run that wrote it (see {path / 'run_config.yaml'}) "
                              f"or start a new train.output_dir")


class CheckpointWeights:
    """A ``modeling.materialize`` source: a checkpoint's weights, each rank reading only the saved pieces that
    overlap its own shards."""

    def __init__(self, path: Path):
        self.directory, self.what = Path(path), "train.resume"
        self.reader = CheckpointReader(path)

    def fill(self, full, targets: dict[str, tuple[torch.Tensor, Any]]) -> None:
        with torch.no_grad():
            for name, (tensor, shard) in targets.items():
                if self.reader.has(f"model/{name}"):
                    give_value(tensor, self.reader.local(f"model/{name}", shard, tuple(tensor.shape), tensor.dtype))


def restore(engine, model, groups, path: Path) -> TrainerState:
    """After ``deepspeed.initialize``: optimizer moments (and fp32 masters), AdamW step count, LR schedule,
    loss scaler and RNG states from ``path``, each rebuilt for this rank's shard of the current layout from
    the saved pieces that overlap it. Of each parameter's moments a rank reads only its ZeRO partition's range
    (``optimizer_state.held_range``), one parameter at a time: no rank builds whole tensors it does not hold."""
    trainer = json.loads((path / "trainer_state.json").read_text())
    reader = CheckpointReader(path)
    layout = shards(model, groups.tp_group)
    by_param: dict[int, tuple[str, torch.nn.Parameter]] = {}
    for name, param in _trainable(engine, model, groups).items():  # a tied parameter is saved under one name
        if id(param) not in by_param or reader.has(f"exp_avg/{name}"):
            by_param[id(param)] = (name, param)
    for key in optimizer_state.MOMENTS + ("master",):
        for name, param in by_param.values():
            held = optimizer_state.held_range(engine, param)
            if held is not None and reader.has(f"{key}/{name}"):
                values = reader.local_range(f"{key}/{name}", layout[name], _local_shape(param), torch.float32,
                                            *held)
                optimizer_state.put_range(engine, param, key, values)
            elif key != "master" and not reader.has(f"{key}/{name}"):
                raise CheckpointError(f"{path}: no {key} for {name}")
    optimizer_state.set_optimizer_steps(engine, trainer["optimizer_steps"])
    _restore_lr_schedule(engine, trainer["lr_scheduler"])
    _restore_loss_scaler(engine, trainer["loss_scaler"])
    engine.global_steps = trainer["step"]
    engine.global_samples = trainer["consumed_samples"]
    engine.skipped_steps = trainer["skipped_steps"]
    _restore_rng(path, trainer["layout"], groups, getattr(model, "tensor_parallel_rng", None))
    return TrainerState(trainer["step"], trainer["consumed_samples"], trainer["skipped_steps"])


def _restore_lr_schedule(engine, saved: dict[str, Any] | None) -> None:
    """The schedule's position (its step count) from the checkpoint; its shape (peak lr, warm-up, floor,
    length) from this run's config, so a changed ``optim.*`` or ``train.steps`` takes effect from the resumed
    step, as in HF Trainer."""
    scheduler = engine.lr_scheduler
    if scheduler is None or saved is None:
        return
    scheduler.load_state_dict({**saved, "base_lrs": scheduler.base_lrs})
    lrs = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler._last_lr = lrs
    for group, lr in zip(optimizer_state._base(engine).param_groups, lrs):
        group["lr"] = lr


def changed_settings(path: Path, run_config: dict[str, Any]) -> list[str]:
    """'key: saved -> now' for every config value that differs from the run that wrote the checkpoint
    ``path`` (``train.resume`` aside)."""
    saved = _flatten(yaml.safe_load((path / "run_config.yaml").read_text()) or {})
    now = _flatten(run_config)
    keys = sorted((set(saved) | set(now)) - {"train.resume"})
    return [f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in keys if saved.get(key) != now.get(key)]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _restore_loss_scaler(engine, saved: dict[str, float]) -> None:
    """fp16's dynamic loss scale (a static scale of 1 in fp32/bf16), each value in the type the scaler keeps."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in saved.items():
        current = getattr(scaler, key, None)
        if torch.is_tensor(current):
            current.fill_(value)
        elif current is not None:
            setattr(scaler, key, type(current)(value))


def _restore_rng(path: Path, saved_layout: dict[str, Any], groups, tensor_parallel_rng=None) -> None:
    """This rank's generators as saved; on a different world size every rank takes rank 0's (ranks share
    the seed in a fresh run too); on a different layout the tensor-parallel dropout generator keeps its
    fresh seed (its state belongs to the saved rank's tensor-parallel position)."""
    world = saved_layout["world_size"]
    rank = dist.get_rank() if world == dist.get_world_size() else 0
    same_layout = (world, saved_layout.get("tensor"), saved_layout.get("pipeline")) == (
        dist.get_world_size(), groups.tensor, groups.pipeline)
    if (path / INDEX).is_file():
        file, key = path / rank_file(rank, world), lambda kind: f"rng/{kind}"
    else:  # format 1: every rank's generators in one file
        file, key = path / "rng.safetensors", lambda kind: f"{kind}/{rank}"
    with safe_open(str(file), framework="pt") as handle:
        torch.set_rng_state(handle.get_tensor(key("torch_cpu")))
        if key("torch_cuda") in handle.keys() and torch.cuda.is_available():
            torch.cuda.set_rng_state(handle.get_tensor(key("torch_cuda")))
        if tensor_parallel_rng is not None and same_layout and key("tensor_parallel") in handle.keys():
            tensor_parallel_rng.load_state(handle.get_tensor(key("tensor_parallel")))
        meta = handle.metadata()
    version, internal, gauss = json.loads(meta[key("python")])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json.loads(meta[key("numpy")])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------- export

def export_hf(engine, model, tokenizer, out_dir: str | Path, groups,
              max_shard_size: str = hf_files.DEFAULT_MAX_SHARD_SIZE) -> Path | None:
    """Write a ``from_pretrained``-loadable directory (sharded safetensors + config + tokenizer), atomically;
    ``out_dir`` must be new, empty, or an earlier export of ours, else a ``CheckpointError`` on every rank and
    nothing changed. The weights are gathered one tensor at a time and rank 0 writes one shard file at a time."""
    out_dir = Path(out_dir)
    plan, tensor_of = _streamed_weights(engine, model, groups, max_shard_size)
    on_rank0(lambda: files.check_export_target(out_dir, fix=_EXPORT_FIX), f"exporting to {out_dir}")

    def write(tmp: Path) -> None:
        hf_files.write_weights(tmp, plan, tensor_of)
        hf_files.write_config_files(tmp, model.config, tokenizer)

    # A refusal is a CheckpointError, raised by on_rank0 on every rank; train.py prints it and exits 2.
    on_rank0(lambda: files.write_export(out_dir, write, fix=_EXPORT_FIX), f"exporting to {out_dir}",
             others=lambda: hf_files.write_weights(None, plan, tensor_of))
    return out_dir


def _streamed_weights(engine, model, groups, max_shard_size: str):
    """(the shard plan of the full weights, ``tensor_of(name)``: the full HF-layout tensor on global rank 0,
    None elsewhere). Every rank must call ``tensor_of`` for the same names in the same order: the owning
    stage's tensor-parallel ranks merge their shards (ZeRO-3: the data-parallel ranks gather the partitions),
    and a later stage sends the result to rank 0; data-parallel replicas of a full copy take no part."""
    zero3 = engine.zero_optimization_stage() == 3
    parameters = {n for n, _ in model.named_parameters()}
    local, owner, spec = _holdings(engine, model, groups)

    def tensor_of(name: str) -> torch.Tensor | None:
        stage, source = owner[name], groups.pp_ranks[owner[name]]
        if groups.pp_rank == stage:
            held = _gathered_partitions(local[name]) if zero3 and name in parameters else local[name].detach()
        if groups.dp_rank != 0:
            return None
        if groups.pp_rank == stage:
            full = merge_tensor(model, name, held, groups.tp_group)
            if stage == 0 or groups.tp_rank != 0:
                return full if dist.get_rank() == 0 else None
            dist.send(full, dst=groups.pp_ranks[0])
        elif groups.pp_rank == 0 and groups.tp_rank == 0:
            full = torch.empty(spec[name][0], dtype=spec[name][1], device=comm_device())
            dist.recv(full, src=source)
            return full
        return None

    return hf_files.shard_plan(spec, max_shard_size), tensor_of


def _gathered_partitions(param) -> torch.Tensor | None:
    """This rank's full (tensor-parallel) piece of a ZeRO-3 parameter on data-parallel rank 0 (collective over
    the parameter's data-parallel group)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone() if dist.get_rank(param.ds_process_group) == 0 else None


def check_export_dir(out_dir: Path) -> None:
    """Before training: the end-of-run export will be allowed to write ``out_dir`` (see ``export_hf``)."""
    files.check_export_target(out_dir, fix=_EXPORT_FIX)


_EXPORT_FIX = ("move what it holds elsewhere (train.export_hf always writes to output_dir/hf; or set "
               "train.export_hf=false and export later with `python -m training.export OUTPUT_DIR NEW_DIR`)")
