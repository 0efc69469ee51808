"""What this rank holds of the model and writes into a checkpoint: its parameters by every HF name, the canonical
names (each tied parameter once), which pipeline stage owns each tensor, and the name of its file."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from modeling.shards import full_shape

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from parallel.groups import ProcessGroups

# name -> (full shape, dtype) of every tensor a checkpoint holds
Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


def rank_file(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


def canonical_names(model: torch.nn.Module) -> list[str]:
    """State-dict keys with each tied parameter once (under its first name), as ``save_pretrained`` does."""
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return [name for name in model.state_dict() if name not in aliases]


def local_params(engine: DeepSpeedEngine, model: torch.nn.Module,
                 groups: ProcessGroups) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters by every HF name they have (a pipeline stage holds only its own)."""
    everything = dict(model.named_parameters(remove_duplicate=False))
    if groups.pipeline == 1:
        return everything
    held = {id(p) for p in engine.module.parameters()}
    return {name: p for name, p in everything.items() if id(p) in held}


def trainable(engine: DeepSpeedEngine, model: torch.nn.Module,
              groups: ProcessGroups) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters that the optimizer updates (frozen ones, e.g. Marian's sinusoidal positions,
    have no optimizer state)."""
    return {name: p for name, p in local_params(engine, model, groups).items() if p.requires_grad}


def local_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(tensor, "ds_shape", tensor.shape))  # ZeRO-3 keeps the unpartitioned shape there


def holdings(engine: DeepSpeedEngine, model: torch.nn.Module,
             groups: ProcessGroups) -> tuple[dict[str, torch.Tensor], dict[str, int], Specs]:
    """(this rank's tensors by canonical HF name, the pipeline stage that owns each name, name -> (full shape,
    dtype) in state-dict order). A tied weight held by several stages is owned by the lowest. Collective: a
    small exchange of names and shapes."""
    names = canonical_names(model)
    local: dict[str, torch.Tensor] = {**{n: b for n, b in model.named_buffers() if groups.is_first_stage},
                                      **local_params(engine, model, groups)}
    local = {n: t for n, t in local.items() if n in set(names)}
    held: list[tuple[int, Specs]] = [(0, {})] * dist.get_world_size()
    dist.all_gather_object(held, (groups.pp_rank, {n: (full_shape(model, n, t), t.dtype) for n, t in local.items()}))
    owner: dict[str, int] = {}
    spec: Specs = {}
    for stage, specs in sorted(held, key=lambda h: h[0]):
        for name, shape_dtype in specs.items():
            owner.setdefault(name, stage)
            spec.setdefault(name, shape_dtype)
    missing = [n for n in names if n not in spec]
    if missing:
        raise RuntimeError(f"no rank holds {missing}")
    return local, owner, {n: spec[n] for n in names}
