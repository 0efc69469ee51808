"""Stored names to model tensors by transformers' own conversion rules, read one stored tensor at a time.

Hub checkpoints store some tensors in another form than the model holds them: Mixtral's, Qwen2/3-MoE's and
DeepSeek's experts one tensor per expert (``experts.0.gate_proj.weight``) where the model holds one 3-D tensor
(``experts.gate_up_proj``), old names (``LayerNorm.gamma``, Mixtral's ``block_sparse_moe``). ``from_pretrained``
converts them by ``transformers.conversion_mapping``; ``plan`` applies the same rules, through transformers' own
functions, to the stored names, and ``read_converted`` builds a rank's part of a converted tensor:

- a conversion that only stacks and concatenates (``MergeModulelist``, ``Concatenate``: the expert fusions) is
  replayed as placements; each stored tensor is then read only where it overlaps the rank's part, one at a time,
  so the rank holds its part plus at most one stored tensor;
- any other conversion runs transformers' own ``convert`` on the whole stored tensors, then the rank's part is cut.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)

from modeling.shards import Shard

SliceOf = Callable[[str], Any]  # stored name -> something indexable by slices (a safetensors slice, a tensor)


@dataclass
class Converted:
    """One converted tensor (or several, for a one-to-many conversion): transformers' converter and its stored
    names per source pattern, in the order ``from_pretrained`` collects them."""

    converter: WeightConverter
    first: str  # the first target's name: transformers' ``layer_name``
    sources: dict[str, list[str]] = field(default_factory=dict)

    def targets(self) -> list[str]:
        """The names this conversion gives values to (how transformers expands its target patterns)."""
        patterns = self.converter.target_patterns
        return [self.first.replace(patterns[0], p) for p in patterns]


def plan(full: PreTrainedModel, stored_names: Iterable[str]) -> tuple[dict[str, str], dict[str, Converted]]:
    """(model name -> stored name, model name -> conversion) for the stored tensors the model has a place for,
    by transformers' rules for this model (``get_model_conversion_mapping``, ``rename_source_key``, which also
    adds or drops the base-model prefix)."""
    mapping = get_model_conversion_mapping(full)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    names = full.state_dict()  # meta tensors and the (small) buffers: nothing is copied
    prefix = full.base_model_prefix
    renamed: dict[str, str] = {}
    converted: dict[str, Converted] = {}
    for key in sorted(stored_names, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if target not in names and key in names:
            target, pattern = rename_source_key(key, [], [], prefix, names)
        if target not in names:
            continue
        if pattern is None:
            renamed.setdefault(target, key)
        else:
            group = converted.setdefault(target, Converted(copy.deepcopy(by_pattern[pattern]), target))
            group.sources.setdefault(pattern, []).append(key)
    return renamed, converted


@dataclass(frozen=True)
class _Part:
    """A stored tensor inside a converted one: its first index in each dimension of the converted tensor, and per
    dimension the stored tensor's own dimension there (None: a dimension the stacking added, of size 1)."""

    key: str
    origin: tuple[int, ...]
    dims: tuple[int | None, ...]


@dataclass(frozen=True)
class Placement:
    shape: tuple[int, ...]
    parts: tuple[_Part, ...]


def _stack(items: list[Placement], dim: int) -> Placement | None:
    if len({p.shape for p in items}) != 1:
        return None
    dim %= len(items[0].shape) + 1
    shape = items[0].shape[:dim] + (len(items),) + items[0].shape[dim:]
    return Placement(shape, tuple(_Part(part.key, part.origin[:dim] + (i,) + part.origin[dim:],
                                      part.dims[:dim] + (None,) + part.dims[dim:])
                                for i, item in enumerate(items) for part in item.parts))


def _concatenate(items: list[Placement], dim: int) -> Placement | None:
    dim %= len(items[0].shape)
    others = {p.shape[:dim] + p.shape[dim + 1:] for p in items}
    if len(others) != 1:
        return None
    parts, offset = [], 0
    for item in items:
        parts += [_Part(p.key, p.origin[:dim] + (p.origin[dim] + offset,) + p.origin[dim + 1:], p.dims)
                  for p in item.parts]
        offset += item.shape[dim]
    return Placement(items[0].shape[:dim] + (offset,) + items[0].shape[dim + 1:], tuple(parts))


def _whole_placed(key: str, shape: tuple[int, ...]) -> Placement:
    return Placement(shape, (_Part(key, (0,) * len(shape), tuple(range(len(shape)))),))


def placement_of(group: Converted, shape_of: Callable[[str], tuple[int, ...]]) -> Placement | None:
    """Where each stored tensor lies in the converted tensor, replaying the converter's operations on
    placements; None when an operation does more than stack and concatenate, or the conversion has several
    targets."""
    ops = group.converter.operations
    if len(group.converter.target_patterns) != 1 or not all(isinstance(op, (MergeModulelist, Concatenate))
                                                           for op in ops):
        return None
    values: dict[str, Placement | list[Placement]] = {pattern: [_whole_placed(k, shape_of(k)) for k in keys]
                                                      for pattern, keys in group.sources.items()}
    for op in ops:
        done: dict[str, Placement | list[Placement] | None]
        if isinstance(op, MergeModulelist):
            done = {p: _stack(v, op.dim) if isinstance(v, list) else v for p, v in values.items()}
        elif isinstance(op, Concatenate):  # in the order of the source patterns, as transformers does
            items = [x for p in group.converter.source_patterns if p in values for x in _listed(values[p])]
            done = {group.first: _concatenate(items, op.dim)}
        values = {p: v for p, v in done.items() if v is not None}
        if len(values) < len(done):
            return None
    if len(values) != 1:
        return None
    result = next(iter(values.values()))
    return None if isinstance(result, list) else result


def _listed(value: Placement | list[Placement]) -> list[Placement]:
    return value if isinstance(value, list) else [value]


def read_placed(placed: Placement, shard: Shard, slice_of: SliceOf, shape_of: Callable[[str], tuple[int, ...]],
                dtype: torch.dtype) -> torch.Tensor:
    """The rank's part ``shard`` of a converted tensor, reading each stored tensor only where it overlaps the
    part, one stored tensor at a time."""
    dim = 0 if shard.dim is None else shard.dim
    windows = ((0, placed.shape[0]),) if shard.dim is None else shard.ranges
    pieces = []
    for start, stop in windows:
        piece = torch.empty(placed.shape[:dim] + (stop - start,) + placed.shape[dim + 1:], dtype=dtype)
        for part in placed.parts:
            stored_shape = shape_of(part.key)
            extent = tuple(1 if d is None else stored_shape[d] for d in part.dims)
            low, high = max(start, part.origin[dim]), min(stop, part.origin[dim] + extent[dim])
            if low >= high:
                continue
            index = [slice(None)] * len(stored_shape)
            stored_dim = part.dims[dim]
            if stored_dim is not None:
                index[stored_dim] = slice(low - part.origin[dim], high - part.origin[dim])
            value = slice_of(part.key)[tuple(index)].to(dtype)
            box = [slice(o, o + e) for o, e in zip(part.origin, extent)]
            box[dim] = slice(low - start, high - start)
            piece[tuple(box)] = value.reshape(tuple(b.stop - b.start for b in box))
            del value
        pieces.append(piece)
    return pieces[0] if shard.dim is None else shard.assemble(pieces)


def convert_whole(group: Converted, full: PreTrainedModel, slice_of: SliceOf) -> dict[str, torch.Tensor]:
    """transformers' own conversion of ``group`` on its whole stored tensors: every target's full value."""
    converter = copy.deepcopy(group.converter)
    for pattern, keys in group.sources.items():
        for key in keys:  # a callable: transformers' synchronous loading calls it when the converter runs
            future = functools.partial(_whole, slice_of, key)  # typed a Future by transformers: a callable works
            converter.add_tensor(group.first, key, pattern, future)  # type: ignore[arg-type]
    values = converter.convert(group.first, model=full, config=full.config)
    return {name: value[0] if isinstance(value, list) else value for name, value in values.items()}


def _whole(slice_of: SliceOf, key: str) -> torch.Tensor:
    return slice_of(key)[...]
