"""Layout-agnostic training checkpoints and the Hugging Face export.

A checkpoint holds the full, unsharded state in the Hugging Face layout, so it resumes at any
(tensor, pipeline, data) layout and any ZeRO stage, and is itself a ``from_pretrained`` directory:

    step_0000010/
      model.safetensors      the weights, HF names (tensor-parallel shards merged, pipeline stages joined)
      optimizer.safetensors  AdamW moments per HF name ('exp_avg/<name>', 'exp_avg_sq/<name>'), plus the
                             fp32 master weights ('master/<name>') when training in bf16/fp16
      rng.safetensors        every rank's torch CPU (and CUDA) generator; Python and NumPy states in its metadata
      trainer_state.json     step, samples consumed, AdamW step count, skipped steps, LR schedule,
                             loss scaler, the layout that wrote it
      config.json, tokenizer files, run_config.yaml
      manifest.json          size and SHA-256 of every file above, written last

Saving gathers on rank 0, which writes (see ``checkpoint_files`` for the crash-safe protocol); loading
verifies the manifest on every rank, puts the weights into the full model before it is sharded, and
after DeepSpeed is set up cuts each parameter's optimizer state to this rank's shard. Nothing is pickled.
"""

from __future__ import annotations

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
from safetensors.torch import load_file, save_file

from modeling.parallelize import full_shape
from modeling.parallelize import full_state_dict as merge_tensor_parallel
from modeling.parallelize import full_tensor as merge_tensor
from modeling.parallelize import shard_of
from parallel.comm import comm_device
from training import checkpoint_files as files
from training import hf_files
from training import optimizer_state
from training.checkpoint_files import CheckpointError, tag_for
from training.rank0 import on_rank0

__all__ = ["CheckpointError", "checkpoint_root", "tag_for", "resolve_resume", "save", "check_weights",
           "restore", "export_hf", "full_state_dict", "TrainerState"]


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


@dataclass(frozen=True)
class TrainerState:
    """What a resumed run continues from."""

    step: int
    consumed_samples: int
    skipped_steps: int


# ------------------------------------------------------------------------------------------- resolving

def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``train.resume`` -> the checkpoint directory to load, verified, or None to start fresh.
    'auto' takes the newest complete checkpoint in ``output_dir`` (incomplete saves are skipped); a path
    may be a checkpoint directory, or a ``checkpoints`` root / run directory (its newest complete one)."""
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
        files.verify(found)
    return found


def agree_on_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``resolve_resume`` on rank 0 (which verifies the files), the answer shared with every rank, and every
    rank checked to see it: a rank resuming while another starts fresh would hang the job later."""
    found = on_rank0(lambda: resolve_resume(resume, output_dir), "finding the checkpoint to resume from")
    shared = [str(found) if found is not None else None]
    dist.broadcast_object_list(shared, src=0)
    chosen = Path(shared[0]) if shared[0] is not None else None
    unseen = torch.tensor([0.0 if chosen is None or (chosen / files.MANIFEST).is_file() else 1.0],
                          device=comm_device())
    dist.all_reduce(unseen, op=dist.ReduceOp.MAX)
    if unseen.item():
        raise CheckpointError(f"train.resume: rank 0 resumes from {chosen}, which is not readable on every rank; "
                              f"train.output_dir (or the checkpoint path) must be on a filesystem all nodes share")
    return chosen


def existing_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoint_root(output_dir)
    return next((p for p in sorted(root.glob("step_*"))), None) if root.is_dir() else None


# -------------------------------------------------------------------------------------------- gathering

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


def _gather(model, groups, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Merge tensor-parallel shards and join pipeline stages: the full tensors on global rank 0."""
    merged = merge_tensor_parallel(model, groups.tp_group, local)
    if groups.pipeline > 1:
        stages = [None] * groups.pipeline if groups.is_first_stage else None
        dist.gather_object({k: v.cpu() for k, v in merged.items()}, stages, dst=groups.pp_ranks[0],
                           group=groups.pp_group)
        if dist.get_rank() != 0:
            return None
        merged = {name: tensor for stage in stages for name, tensor in stage.items()}
    return merged if dist.get_rank() == 0 else None


def full_state_dict(engine, model, groups) -> dict[str, torch.Tensor] | None:
    """The unsharded model weights (HF names, each tied weight once) on global rank 0, None elsewhere:
    ZeRO-3 partitions gathered, tensor-parallel shards merged, pipeline stages joined. Collective."""
    names = _canonical_names(model)
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers params in their own dtype
    else:
        local = {k: v.detach() for k, v in _local_params(engine, model, groups).items()}
        local.update({k: v for k, v in model.named_buffers() if k in set(names)})
        state = _gather(model, groups, local)
    if dist.get_rank() != 0:
        return None
    return {n: state[n].detach().cpu().contiguous() for n in names if n in state}


def _check_complete(model, state: dict[str, torch.Tensor]) -> None:
    """Rank 0, inside ``on_rank0``: every weight was gathered (so the failure reaches every rank)."""
    missing = [n for n in _canonical_names(model) if n not in state]
    if missing:
        raise RuntimeError(f"no rank holds {missing}")


def _trainable(engine, model, groups) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters that the optimizer updates (frozen ones, e.g. Marian's sinusoidal positions,
    have no optimizer state)."""
    return {name: p for name, p in _local_params(engine, model, groups).items() if p.requires_grad}


def _optimizer_tensors(engine, model, groups, keys) -> dict[str, torch.Tensor] | None:
    """'key/name' -> the full optimizer tensor, on global rank 0. Collective."""
    params = _trainable(engine, model, groups)
    names = set(_canonical_names(model))
    out = {}
    for key in keys:
        local = {name: optimizer_state.get(engine, p, key) for name, p in params.items()}
        full = local if engine.zero_optimization_stage() == 3 else _gather(model, groups, local)
        if full is not None:
            out.update({f"{key}/{n}": t.detach().cpu().contiguous() for n, t in full.items() if n in names})
    return out if dist.get_rank() == 0 else None


def _rng_state() -> dict[str, Any]:
    state = {"torch_cpu": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _loss_scaler_state(engine) -> dict[str, float]:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    keys = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
    return {k: float(getattr(scaler, k)) for k in keys if scaler is not None and hasattr(scaler, k)}


# ----------------------------------------------------------------------------------------------- saving

def save(engine, model, tokenizer, groups, run_config: dict[str, Any], step: int, consumed_samples: int,
         output_dir: str | Path) -> Path:
    """Write the checkpoint of ``step``; collective over all ranks. Returns its directory on every rank."""
    precision = run_config.get("precision", "fp32")
    weights = full_state_dict(engine, model, groups)
    keys = optimizer_state.MOMENTS + (("master",) if precision != "fp32" else ())
    optim = _optimizer_tensors(engine, model, groups, keys)
    rngs = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(_rng_state(), rngs, dst=0)
    trainer = {
        "step": step, "consumed_samples": consumed_samples,
        "optimizer_steps": optimizer_state.optimizer_steps(engine),
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "loss_scaler": _loss_scaler_state(engine),
        "layout": {"tensor": groups.tensor, "pipeline": groups.pipeline, "data": groups.data,
                   "world_size": dist.get_world_size(), "zero_stage": engine.zero_optimization_stage(),
                   "precision": precision},
    }

    def write() -> Path:
        _check_complete(model, weights)
        staging = files.begin(checkpoint_root(output_dir), step)
        _write_tensors(staging / "model.safetensors", weights, {"format": "pt"})
        _write_tensors(staging / "optimizer.safetensors", optim, None)
        _write_tensors(staging / "rng.safetensors",
                       {f"{k}/{r}": s[k] for r, s in enumerate(rngs) for k in ("torch_cpu", "torch_cuda") if k in s},
                       {f"{k}/{r}": json.dumps(s[k]) for r, s in enumerate(rngs) for k in ("python", "numpy")})
        files.write_text_atomic(staging / "trainer_state.json", json.dumps(trainer, indent=1))
        files.write_text_atomic(staging / "run_config.yaml", yaml.safe_dump(run_config, sort_keys=False))
        files.write_atomic(staging / "config.json", lambda tmp: model.config.to_json_file(str(tmp)))
        tokenizer.save_pretrained(str(staging))
        return files.commit(staging, step)

    on_rank0(write, f"saving the checkpoint of step {step}")
    return checkpoint_root(output_dir) / tag_for(step)  # on every rank: each must know the save happened


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    files.write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ---------------------------------------------------------------------------------------------- loading

def check_weights(model, path: Path) -> None:
    """A checkpoint of another model (names or shapes differ from ``model``'s, which may be on the meta device)
    is an error naming them, before anything is read."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name in set(_canonical_names(model))}
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        saved = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
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


def restore(engine, model, groups, path: Path) -> TrainerState:
    """After ``deepspeed.initialize``: optimizer moments (and fp32 masters), AdamW step count, LR schedule,
    loss scaler and RNG states from ``path``, each cut to this rank's shard of the current layout."""
    trainer = json.loads((path / "trainer_state.json").read_text())
    with safe_open(str(path / "optimizer.safetensors"), framework="pt") as handle:
        saved = set(handle.keys())
        params = _trainable(engine, model, groups)
        by_param: dict[int, tuple[str, torch.nn.Parameter]] = {}
        for name, param in params.items():  # a tied parameter is stored under one of its names
            if id(param) not in by_param or f"exp_avg/{name}" in saved:
                by_param[id(param)] = (name, param)
        for key in optimizer_state.MOMENTS + ("master",):
            for name, param in by_param.values():
                if f"{key}/{name}" in saved:
                    full = handle.get_tensor(f"{key}/{name}")
                    optimizer_state.put(engine, param, key, shard_of(model, name, full, groups.tp_group))
                elif key != "master":
                    raise CheckpointError(f"{path / 'optimizer.safetensors'}: no {key} for {name}")
    optimizer_state.set_optimizer_steps(engine, trainer["optimizer_steps"])
    _restore_lr_schedule(engine, trainer["lr_scheduler"])
    _restore_loss_scaler(engine, trainer["loss_scaler"])
    engine.global_steps = trainer["step"]
    engine.global_samples = trainer["consumed_samples"]
    engine.skipped_steps = trainer["skipped_steps"]
    _restore_rng(path, trainer["layout"])
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


def _restore_rng(path: Path, saved_layout: dict[str, Any]) -> None:
    """This rank's generators as saved; on a different world size every rank takes rank 0's (ranks share
    the seed in a fresh run too)."""
    rank = dist.get_rank() if saved_layout["world_size"] == dist.get_world_size() else 0
    with safe_open(str(path / "rng.safetensors"), framework="pt") as handle:
        torch.set_rng_state(handle.get_tensor(f"torch_cpu/{rank}"))
        if f"torch_cuda/{rank}" in handle.keys() and torch.cuda.is_available():
            torch.cuda.set_rng_state(handle.get_tensor(f"torch_cuda/{rank}"))
        meta = handle.metadata()
    version, internal, gauss = json.loads(meta[f"python/{rank}"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json.loads(meta[f"numpy/{rank}"])
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
    names, zero3 = _canonical_names(model), engine.zero_optimization_stage() == 3
    parameters = {n for n, _ in model.named_parameters()}
    local = {**{n: b for n, b in model.named_buffers() if groups.is_first_stage},
             **_local_params(engine, model, groups)}
    specs = [None] * dist.get_world_size()
    dist.all_gather_object(specs, (groups.pp_rank, {n: (full_shape(model, n, t), t.dtype)
                                                     for n, t in local.items() if n in set(names)}))
    owner, spec = {}, {}
    for stage, held in sorted(specs, key=lambda s: s[0]):
        for name, shape_dtype in held.items():
            owner.setdefault(name, stage)
            spec.setdefault(name, shape_dtype)
    missing = [n for n in names if n not in spec]
    if missing:
        raise RuntimeError(f"no rank holds {missing}")

    def tensor_of(name: str) -> torch.Tensor | None:
        if zero3:
            return _gathered_partitions(local[name]) if name in parameters else local[name]
        if groups.dp_rank != 0:
            return None
        stage, source = owner[name], groups.pp_ranks[owner[name]]
        if groups.pp_rank == stage:
            full = merge_tensor(model, name, local[name].detach(), groups.tp_group)
            if stage == 0 or groups.tp_rank != 0:
                return full if dist.get_rank() == 0 else None
            dist.send(full, dst=groups.pp_ranks[0])
        elif groups.pp_rank == 0 and groups.tp_rank == 0:
            full = torch.empty(spec[name][0], dtype=spec[name][1], device=comm_device())
            dist.recv(full, src=source)
            return full
        return None

    return hf_files.shard_plan({n: spec[n] for n in names}, max_shard_size), tensor_of


def _gathered_partitions(param) -> torch.Tensor | None:
    """A ZeRO-3 parameter's full value on rank 0 (collective over its data-parallel group)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone() if dist.get_rank() == 0 else None


def check_export_dir(out_dir: Path) -> None:
    """Before training: the end-of-run export will be allowed to write ``out_dir`` (see ``export_hf``)."""
    files.check_export_target(out_dir, fix=_EXPORT_FIX)


_EXPORT_FIX = ("move what it holds elsewhere (train.export_hf always writes to output_dir/hf; or set "
               "train.export_hf=false and export later with `python -m training.export OUTPUT_DIR NEW_DIR`)")
