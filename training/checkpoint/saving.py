"""Saving a checkpoint: every rank writes the pieces it alone holds into its own file, in parallel (or, with
``train.async_save``, from a host copy in a background thread); rank 0 then writes the index, the trainer state
and the run files and commits the directory (``files``: manifest, rename). The layout is in the package's
docstring."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open

from modeling.shards import full_shape, shards
from training import outer_sync
from training.checkpoint import files, hf_files, optimizer_state
from training.checkpoint.background import await_ranks, report_failed, report_written
from training.checkpoint.files import tag_for
from training.checkpoint.hf_files import write_safetensors
from training.checkpoint.holdings import canonical_names, holdings, local_shape, rank_file
from training.checkpoint.pieces import INDEX, Piece
from training.checkpoint.resume import checkpoint_root
from training.rank0 import on_every_rank, on_rank0

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from parallel.groups import ProcessGroups
    from training.checkpoint.background import BackgroundSave


def save(engine: DeepSpeedEngine, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, groups: ProcessGroups,
         run_config: dict[str, Any], step: int, consumed_samples: int, output_dir: str | Path,
         background: BackgroundSave | None = None, timeout_s: float = 1800.0) -> Path:
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
    local, owner, _ = holdings(engine, model, groups)
    on_rank0(lambda: files.begin(root, step), f"starting the checkpoint of step {step}")
    staging = files.staging_dir(root, step)
    trainer = copy.deepcopy(_trainer_state(engine, groups, step, consumed_samples, run_config))  # as of now

    def finish(written: dict[str, dict]) -> Path:
        return _commit(staging, model, tokenizer, run_config, trainer, step, written)

    def rank_values() -> tuple[str, dict, dict]:
        return _rank_values(engine, model, groups, kinds, local, owner)

    if background is None:
        written = on_every_rank(lambda: _write_rank_file(staging, *rank_values()),
                                f"writing the checkpoint of step {step}")
        on_rank0(lambda: finish(dict(written)), f"saving the checkpoint of step {step}")
    else:
        pieces: dict[str, tuple[str, dict, dict]] = {}
        on_every_rank(lambda: pieces.update(snapshot=_host_copy(*rank_values())),
                      f"copying the checkpoint of step {step} to host memory")
        background.start(step, lambda: _write_in_background(staging, pieces["snapshot"], finish, timeout_s))
    return root / tag_for(step)  # on every rank: each must know the save happened


def _trainer_state(engine: DeepSpeedEngine, groups: ProcessGroups, step: int, consumed_samples: int,
                   run_config: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run continues from, and the layout that wrote the checkpoint (the ZeRO stage is the run's
    ``parallel.zero_stage``, which the engine's DeepSpeed JSON carries: ``training.deepspeed_config``)."""
    return {
        "step": step, "consumed_samples": consumed_samples,
        "optimizer_steps": optimizer_state.optimizer_steps(engine),
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "loss_scaler": _loss_scaler_state(engine),
        "layout": {"tensor": groups.tensor, "pipeline": groups.pipeline, "data": groups.data,
                   "world_size": dist.get_world_size(), "zero_stage": optimizer_state.zero_stage(engine),
                   "precision": run_config.get("precision", "fp32")},
    }


def _commit(staging: Path, model, tokenizer, run_config, trainer, step: int, written: dict[str, dict]) -> Path:
    """Rank 0, once every rank's file is written: the index, the trainer state and the run files, then
    ``files.commit`` (manifest, rename)."""
    index = _index(staging, canonical_names(model), trainer["layout"]["world_size"])
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
    compression = getattr(engine, "gradient_compression", None)
    if compression is not None:  # this rank's error-feedback residuals: read back by the same layout only
        values.update(compression.state())
    values.update(outer_sync.replica_values(engine))  # this rank's outer loop (parallel.sync_every), likewise
    for name, tensor in local.items():
        if owner[name] != groups.pp_rank or (not getattr(tensor, "tensor_model_parallel", False)
                                              and groups.tp_rank != 0):
            continue  # another stage's tied copy, or a copy every tensor-parallel rank holds: written once
        for kind in kinds if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad else ("model",):
            part = optimizer_state.owned_part(engine, tensor, kind, groups.dp_rank, groups.data)
            if part is None:
                continue
            start, values[f"{kind}/{name}"] = part
            metadata[f"{kind}/{name}"] = json.dumps(Piece(
                file, f"{kind}/{name}", start, part[1].numel(), local_shape(tensor), full_shape(model, name, tensor),
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
        report_written(staging, rank, *_write_rank_file(staging, *snapshot))
    except BaseException as exc:
        report_failed(staging, rank, exc)
        raise
    if rank == 0:
        finish(await_ranks(staging, world, timeout_s))


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
