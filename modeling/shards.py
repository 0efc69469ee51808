"""The shard contract: where a tensor-parallel rank's tensor lies in the full tensor of the Hugging Face layout.

``Shard`` (dimension, ranges of the full tensor, local size, transposed) is the one description every reader and
writer of weights uses: materialization cuts a rank's part from the full tensors by it, checkpoints record the
pieces they save by it, and ``full_tensor`` / ``full_state_dict`` merge the shards back (collective). The slice
rule itself is ``parallel.layers.shard_ranges``; a layer built from transformers' ``Conv1D`` (marked
``hf_conv1d`` by ``modeling.tensor_parallel``) holds its weight transposed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from parallel.layers import join_pieces, shard_ranges


def _merge(shards: list[torch.Tensor], param: Any) -> torch.Tensor:
    """The full tensor from every tensor-parallel rank's shard (in rank order), placed by ``shard_ranges``."""
    dim, world, size = param.partition_dim, len(shards), param.tp_full_size
    shape = list(shards[0].shape)
    shape[dim] = size
    full = shards[0].new_empty(shape)
    for rank, shard in enumerate(shards):
        ranges, _ = shard_ranges(size, rank, world, param.tp_fused_chunks, shard.shape[dim] * world)
        offset = 0
        for start, stop in ranges:
            full.narrow(dim, start, stop - start).copy_(shard.narrow(dim, offset, stop - start))
            offset += stop - start
    return full


@dataclass(frozen=True)
class Shard:
    """Where this rank's tensor lies in the full tensor of the HF layout: along ``dim`` the ``ranges`` of the
    full tensor, concatenated, then zeros up to ``size`` (a padded vocabulary); ``dim`` None: held whole.
    ``transposed``: the rank holds it transposed (transformers' Conv1D stores (in, out), our layers (out, in))."""

    dim: int | None
    ranges: tuple[tuple[int, int], ...] = ()
    size: int = 0
    transposed: bool = False

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor, in this rank's layout (a copy)."""
        if self.dim is None:
            return full
        return self.assemble([full.narrow(self.dim, a, b - a) for a, b in self.ranges])

    def read(self, stored: Any, full_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """This rank's part read from a ``safe_open(...).get_slice(name)`` (only the bytes it keeps), as ``dtype``."""
        if self.dim is None:
            return stored[tuple(slice(None) for _ in full_shape)].to(dtype)
        lead = (slice(None),) * self.dim
        return self.assemble([stored[lead + (slice(a, b),)].to(dtype) for a, b in self.ranges])

    def assemble(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """This rank's tensor from the pieces of its ``ranges`` (in order) of a sharded tensor."""
        if self.dim is None:
            raise ValueError("a tensor held whole has no pieces to assemble")
        local = join_pieces(pieces, self.dim, self.size)
        return local.t().contiguous() if self.transposed else local


def shard_for(tensor: torch.Tensor, hf_conv1d: bool, tp_group: ProcessGroup | None) -> Shard:
    """The ``Shard`` of a parameter or buffer of a tensor-parallel model (``parallel.layers.shard_ranges``); an
    expert tensor of an expert-parallel model holds its ``expert_range`` of the experts (``modeling.experts``)."""
    if hasattr(tensor, "expert_range"):
        start, stop = tensor.expert_range  # type: ignore[attr-defined]
        return Shard(0, ((start, stop),), stop - start)
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    if world == 1 or not getattr(tensor, "tensor_model_parallel", False):
        return Shard(None)
    marked: Any = tensor  # the marks of ``parallel.layers.mark_sharded``
    dim = marked.partition_dim
    shape = getattr(tensor, "ds_shape", tensor.shape)  # ZeRO-3 keeps a flat partition, its real shape there
    transposed = hf_conv1d and len(shape) == 2
    local_size = shape[dim]
    ranges, size = shard_ranges(marked.tp_full_size, dist.get_rank(tp_group), world, marked.tp_fused_chunks,
                                local_size * world)
    return Shard(1 - dim if transposed else dim, tuple(ranges), size, transposed)


def shards(model: nn.Module, tp_group: ProcessGroup | None) -> dict[str, Shard]:
    """Every parameter's and persistent buffer's ``Shard``, by HF name (tied weights under each name)."""
    return {name: shard_for(tensor, getattr(_owner(model, name), "hf_conv1d", False), tp_group)
            for name, tensor in _tensors(model).items()}


def _owner(model: nn.Module, name: str) -> nn.Module:
    parent = name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def shard_of(model: nn.Module, name: str, full: torch.Tensor, tp_group: ProcessGroup | None) -> torch.Tensor:
    """This rank's shard of ``name`` cut from the full HF-layout tensor ``full``; the inverse of the merge in
    ``full_state_dict``. Unsharded tensors come back as they are."""
    hf_conv1d = getattr(_owner(model, name), "hf_conv1d", False)
    return shard_for(_tensors(model)[name], hf_conv1d, tp_group).cut(full)


def full_state_dict(model: nn.Module, tp_group: ProcessGroup | None,
                    state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights with every tensor-parallel shard gathered and merged, in the HF layout
    (Conv1D weights transposed back). Collective over ``tp_group``."""
    state = model.state_dict() if state is None else state
    return {name: full_tensor(model, name, tensor, tp_group) for name, tensor in state.items()}


def full_tensor(model: nn.Module, name: str, tensor: torch.Tensor, tp_group: ProcessGroup | None) -> torch.Tensor:
    """The full HF-layout tensor of ``name`` from this rank's ``tensor`` (its shard, or a value in its layout,
    e.g. a gradient): tensor-parallel shards gathered and merged, Conv1D transposed back. Collective over
    ``tp_group`` for a sharded parameter."""
    param = _tensors(model).get(name)
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    if world == 1 or param is None or not getattr(param, "tensor_model_parallel", False):
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(shards, tensor.contiguous(), group=tp_group)
    full = _merge(shards, param)
    if getattr(_owner(model, name), "hf_conv1d", False) and full.dim() == 2:
        full = full.t()
    return full.contiguous()


def full_shape(model: nn.Module, name: str, tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape of the full HF-layout tensor of this rank's ``tensor`` of ``name``: tensor-parallel shards
    merged, expert-parallel blocks joined (no communication)."""
    shape = list(getattr(tensor, "ds_shape", tensor.shape))  # ZeRO-3 keeps the unpartitioned shape there
    marked: Any = tensor
    if hasattr(marked, "expert_total"):
        shape[0] = marked.expert_total
    if getattr(marked, "tensor_model_parallel", False):
        shape[marked.partition_dim] = marked.tp_full_size
        if getattr(_owner(model, name), "hf_conv1d", False) and len(shape) == 2:
            shape.reverse()
    return tuple(shape)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
