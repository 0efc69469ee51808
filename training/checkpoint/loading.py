"""Loading a checkpoint at any layout: the model's weights (``CheckpointWeights``, a ``modeling.materialize``
source, before the model exists in memory) and, after ``deepspeed.initialize``, the optimizer state, schedule,
loss scaler and RNG states (``restore``), each rank reading only the saved pieces that overlap its shards."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

from modeling.materialize import give_value
from modeling.shards import shards
from training.checkpoint import optimizer_state
from training.checkpoint.files import CheckpointError
from training.checkpoint.holdings import canonical_names, local_shape, rank_file, trainable
from training.checkpoint.pieces import INDEX, CheckpointReader

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from parallel.groups import ProcessGroups


@dataclass(frozen=True)
class TrainerState:
    """What a resumed run continues from."""

    step: int
    consumed_samples: int
    skipped_steps: int
    residuals_restarted: str | None = None  # why the error-feedback residuals start at zero, if they do


def check_weights(model: torch.nn.Module, path: Path) -> None:
    """A checkpoint of another model (names or shapes differ from ``model``'s, which may be on the meta device)
    is an error naming them, before anything is read."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name in set(canonical_names(model))}
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

    def fill(self, full: Any, targets: dict[str, tuple[torch.Tensor, Any]]) -> None:
        with torch.no_grad():
            for name, (tensor, shard) in targets.items():
                if self.reader.has(f"model/{name}"):
                    give_value(tensor, self.reader.local(f"model/{name}", shard, tuple(tensor.shape), tensor.dtype))


def restore(engine: DeepSpeedEngine, model: torch.nn.Module, groups: ProcessGroups, path: Path) -> TrainerState:
    """After ``deepspeed.initialize``: optimizer moments (and fp32 masters), AdamW step count, LR schedule,
    loss scaler and RNG states from ``path``, each rebuilt for this rank's shard of the current layout from
    the saved pieces that overlap it. Of each parameter's moments a rank reads only its ZeRO partition's range
    (``optimizer_state.held_range``), one parameter at a time: no rank builds whole tensors it does not hold."""
    trainer = json.loads((path / "trainer_state.json").read_text())
    reader = CheckpointReader(path)
    layout = shards(model, groups.tp_group)
    by_param: dict[int, tuple[str, torch.nn.Parameter]] = {}
    for name, param in trainable(engine, model, groups).items():  # a tied parameter is saved under one name
        if id(param) not in by_param or reader.has(f"exp_avg/{name}"):
            by_param[id(param)] = (name, param)
    for key in optimizer_state.MOMENTS + ("master",):
        for name, param in by_param.values():
            held = optimizer_state.held_range(engine, param)
            if held is not None and reader.has(f"{key}/{name}"):
                values = reader.local_range(f"{key}/{name}", layout[name], local_shape(param), torch.float32,
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
    restarted = _restore_rank_state(engine, path, trainer["layout"], groups, trainer["step"])
    return TrainerState(trainer["step"], trainer["consumed_samples"], trainer["skipped_steps"], restarted)


def _restore_rank_state(engine, path: Path, saved_layout: dict[str, Any], groups, step: int) -> str | None:
    """What each rank alone holds of ``parallel.grad_compression`` (error-feedback residuals) and of
    ``parallel.sync_every`` (the outer loop's anchor, momentum and residuals), from this rank's file when the
    checkpoint was written by the same (world, tensor, pipeline) layout (each rank's state belongs to its place in
    the data order); else they start afresh (residuals and momentum zero, the anchor the loaded weights) and
    the reason is returned."""
    compression = getattr(engine, "gradient_compression", None)
    compression = compression if compression is not None and compression.error_feedback else None
    outer = getattr(engine, "outer_sync", None)
    if compression is None and outer is None:
        return None
    same = (saved_layout["world_size"], saved_layout.get("tensor"), saved_layout.get("pipeline")) == (
        dist.get_world_size(), groups.tensor, groups.pipeline)
    if not same:
        return (f"the checkpoint's layout (world {saved_layout['world_size']}, tensor {saved_layout.get('tensor')}, "
                f"pipeline {saved_layout.get('pipeline')}) differs from this run's")
    with safe_open(str(path / rank_file(dist.get_rank(), dist.get_world_size())), framework="pt") as handle:
        saved = {prefix: {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}
                 for prefix in ("residual/", "outer/")}
    if compression is not None and saved["residual/"]:
        compression.load_state(saved["residual/"], engine)
    if outer is not None and saved["outer/"]:
        outer.load_state_dict(saved["outer/"], step)
    parts = (("residuals", compression, "residual/"), ("outer state", outer, "outer/"))
    missing = [what for what, part, prefix in parts if part is not None and not saved[prefix]]
    return f"the checkpoint holds no {' or '.join(missing)}" if missing else None


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
    for group, lr in zip(optimizer_state.base_optimizer(engine).param_groups, lrs):
        group["lr"] = lr


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
