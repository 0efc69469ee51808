"""Weight-only int8 for inference: every linear and embedding weight of a model held as int8 with one fp32 scale
per output channel (per row of an embedding), dequantised when a forward reads it.

Symmetric per-channel rounding: ``scale = max|w| / 127`` over the input dimension (1 for a row of zeros),
``q = round(w / scale)``, so each weight is off by at most ``scale / 2``. ``quantize_int8`` keeps every module
and its forward: the ``weight`` Parameter becomes the buffers ``weight_int8`` and ``weight_scale`` (kept
dimensions, so ``weight_int8 * weight_scale`` broadcasts in the layer's own layout) and the module's class a
subclass of its own whose ``weight`` property returns ``weight_int8.to(dtype) * weight_scale.to(dtype)`` in the
weight's former dtype. Linear layers (``nn.Linear``, transformers' ``Conv1D`` stored (in, out), and
``parallel.layers``' column-, row- and vocabulary-parallel layers) therefore run their usual math and their
collectives unchanged; a tensor-parallel rank quantises its own shard, so a column-parallel shard's scales are
the full layer's, a row-parallel shard's are its own (each output channel over this rank's inputs). Embeddings
(``nn.Embedding`` and its subclasses, ``VocabParallelEmbedding``) look up int8 rows and their scales, dequantising
only the rows read. A weight tied to several modules (GPT-2's head and token embedding) is quantised once and
both read the same int8 tensor. Norms, biases and every other parameter keep their dtype.

For inference (``eval()``, ``torch.no_grad``): the int8 buffers take no gradient. Quantise once the model has
its inference dtype (the dequantised weight takes the dtype the weight had); a quantised module's class is made
here, so such a model deep-copies but does not pickle.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from parallel.comm import reduce_from_tensor_parallel_region
from parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

QMAX = 127
# The tensor-parallel marks of ``parallel.layers.mark_sharded`` (and ``modeling.tensor_parallel``'s), carried from
# a sharded weight to its int8 tensor (and to its scales where they are split the same way) for
# ``modeling.shards``.
_SHARD_MARKS = ("tensor_model_parallel", "partition_dim", "tp_full_size", "tp_fused_chunks")


def _amax(weight: torch.Tensor, input_dim: int) -> torch.Tensor:
    """max |w| over the input dimension, one per output channel (kept dimensions)."""
    return weight.abs().amax(dim=input_dim, keepdim=True)


def quantize_weight(weight: torch.Tensor, input_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scales) of ``weight``: symmetric, one scale per slice across ``input_dim`` (the scales
    keep that dimension with size 1); a slice of zeros gets scale 1. Dequantised: ``q.float() * scale``."""
    w = weight.detach().float()
    amax = _amax(w, input_dim)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def _input_dim(module: nn.Module) -> int | None:
    """The dimension of ``module.weight`` that a scale spans (the input features), None for a module whose
    weight is not quantised. transformers' ``Conv1D`` stores (in, out); the others (out, in) or (rows, width)."""
    if isinstance(module, Conv1D) or type(module).__name__ == "Conv1D":  # remote-code models carry copies of it
        return 0
    if isinstance(module, (nn.Linear, ColumnParallelLinear, RowParallelLinear, nn.Embedding, VocabParallelEmbedding)):
        return 1
    return None


class _Int8Weight:
    """The ``weight`` of a quantised module: dequantised from its int8 buffer on each read."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    dequant_dtype: torch.dtype

    @property
    def weight(self) -> torch.Tensor:
        dtype = self.dequant_dtype
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)


def _rows(module: Any, ids: torch.Tensor) -> torch.Tensor:
    """The dequantised rows ``ids`` of ``module``'s int8 table: only those rows are converted."""
    dtype = module.dequant_dtype
    return F.embedding(ids, module.weight_int8).to(dtype) * F.embedding(ids, module.weight_scale).to(dtype)


class _Int8Rows(nn.Embedding):
    """``nn.Embedding``'s lookup on the int8 table; under a subclass's own forward (Marian's positions, which call
    ``super().forward``) in the method order. padding_idx, scale_grad_by_freq and sparse act on gradients only."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _rows(self, input)


class _Int8VocabRows(VocabParallelEmbedding):
    """``VocabParallelEmbedding.forward`` on the int8 table: this rank's rows, zeros for ids it does not own,
    the same all-reduce."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = _rows(self, local).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.group)


@functools.cache
def _int8_class(cls: type) -> type:
    """The quantised counterpart of ``cls``: ``weight`` dequantised first in the method order, an embedding's
    lookup on int8 rows after ``cls``'s own forward. Made once per class (``isinstance`` with ``cls`` holds)."""
    lookup = (_Int8VocabRows if issubclass(cls, VocabParallelEmbedding)
              else _Int8Rows if issubclass(cls, nn.Embedding) else None)
    own = [] if lookup is not None and cls in lookup.__bases__ else [cls]
    bases = (_Int8Weight, *own, *([lookup] if lookup is not None else []))
    return type(f"Int8{cls.__name__}", bases, {"__module__": __name__, "__qualname__": f"Int8{cls.__name__}"})


def _check_quantisable(module: nn.Module, name: str, weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"cannot quantise {name} ({type(module).__name__}): its weight has shape "
                         f"{tuple(weight.shape)}, expected 2 dimensions")
    if getattr(module, "max_norm", None) is not None:
        raise ValueError(f"cannot quantise {name} ({type(module).__name__}): max_norm renormalises its rows in "
                         f"place on each lookup, which an int8 table cannot take")


def _carry_marks(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, input_dim: int) -> None:
    """The weight's shard marks on its int8 tensor, and on its scales unless the weight is split along the
    input dimension (a row-parallel shard's scales are this rank's own, not a part of the full layer's)."""
    marks = {key: getattr(weight, key) for key in _SHARD_MARKS if hasattr(weight, key)}
    if not marks.get("tensor_model_parallel"):
        return
    for tensor in (q, scale) if marks["partition_dim"] != input_dim else (q,):
        for key, value in marks.items():
            setattr(tensor, key, value)


def _swap(module: nn.Module, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    """``module``'s weight Parameter replaced by the int8 buffers, its class by the quantised one."""
    del module._parameters["weight"]
    module.register_buffer("weight_int8", q)
    module.register_buffer("weight_scale", scale)
    module.dequant_dtype = dtype  # type: ignore[assignment]  # torch's stub: Module attributes Tensor | Module only
    cls: type = type(module)
    module.__class__ = _int8_class(cls)


def quantize_int8(model: nn.Module) -> int:
    """Quantise in place every linear and embedding weight of ``model`` (see the module's docstring); returns
    the number of weight tensors quantised (a tied weight counts once; 0 on an already quantised model).
    ValueError naming the module for a weight that cannot be quantised."""
    done: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            input_dim = _input_dim(module)
            weight = module._parameters.get("weight") if input_dim is not None else None
            if weight is None or input_dim is None:
                continue  # not a quantised kind, or quantised already
            _check_quantisable(module, name, weight)
            if id(weight) not in done:
                q, scale = quantize_weight(weight, input_dim)
                _carry_marks(weight, q, scale, input_dim)
                done[id(weight)] = (q, scale, input_dim)
            q, scale, tied_dim = done[id(weight)]
            if tied_dim != input_dim:
                raise ValueError(f"cannot quantise {name} ({type(module).__name__}): its weight is tied to a "
                                 f"module that reads it along another dimension")
            _swap(module, q, scale, weight.dtype)
    return len(done)


def _persistent_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and persistent buffer of ``model`` (each module once)."""
    tensors: list[torch.Tensor] = []
    for module in model.modules():
        tensors += [p for p in module._parameters.values() if p is not None]
        tensors += [b for name, b in module._buffers.items()
                    if b is not None and name not in module._non_persistent_buffers_set]
    return tensors


def _byte_span(tensor: torch.Tensor) -> tuple[int, int]:
    """[start, stop) in bytes of the part of its storage that ``tensor`` reaches."""
    size = tensor.element_size()
    start = int(tensor.storage_offset()) * size
    if tensor.numel() == 0:
        return start, start
    extent = 1 + sum((int(n) - 1) * int(stride) for n, stride in zip(tensor.shape, tensor.stride()))
    return start, start + extent * size


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers of ``model``, storage shared by several tensors (tied
    weights, views) counted once. Meta tensors count their own size."""
    spans: dict[Any, list[tuple[int, int]]] = {}
    for tensor in _persistent_tensors(model):
        if tensor.device.type == "meta":
            spans[("meta", id(tensor))] = [(0, tensor.numel() * tensor.element_size())]
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        spans.setdefault(key, []).append(_byte_span(tensor))
    total = 0
    for ranges in spans.values():
        end = 0
        for start, stop in sorted(ranges):
            total += max(0, stop - max(start, end))
            end = max(end, stop)
    return total
