"""Megatron-style tensor-parallel layers.

Each layer is built from the full (dense) weight by slicing this rank's part (``from_dense``; on the meta device
when the model was built without storage, its values come later from ``modeling.materialize``), so TP=N
starts from exactly TP=1's weights. Sharded parameters carry ``tensor_model_parallel = True`` and
``partition_dim`` (read by DeepSpeed's gradient-norm code: a replicated parameter is counted on tensor
rank 0 only), plus what is needed to merge the shards back (``tp_fused_chunks``, ``tp_full_size``).
Weights use the ``nn.Linear`` layout ``(out_features, in_features)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from parallel.comm import (
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from parallel.region import RegionEntry, column_linear
from parallel.weight_grad import WeightGradStore, linear


def _rank_world(group) -> tuple[int, int]:
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


FusedChunks = int | tuple[int, ...]
"""The blocks a column layer's output dimension is fused from (q|k|v), each split over the tensor ranks on its
own: an int n, n equal blocks; a tuple, the blocks' sizes (q, k and v under grouped-query attention)."""


def mark_sharded(param: nn.Parameter, partition_dim: int, full_size: int, fused_chunks: FusedChunks = 1) -> None:
    marked: Any = param  # the marks are plain attributes of the tensor
    marked.tensor_model_parallel = True
    marked.partition_dim = partition_dim
    marked.tp_full_size = full_size
    marked.tp_fused_chunks = fused_chunks if isinstance(fused_chunks, int) else tuple(fused_chunks)


def fused_blocks(size: int, world: int, chunks: FusedChunks = 1) -> tuple[int, ...]:
    """The sizes of the blocks (``FusedChunks``) of a dimension of ``size``; ValueError naming the sizes unless
    they sum to ``size`` and each divides by the tensor size ``world``."""
    if isinstance(chunks, int):
        if chunks < 1 or size % (chunks * world):
            raise ValueError(f"a dimension of {size} is not divisible by {chunks} blocks x tensor size {world}")
        return (size // chunks,) * chunks
    blocks = tuple(chunks)
    if sum(blocks) != size:
        raise ValueError(f"fused block sizes {blocks} sum to {sum(blocks)}, not to the dimension's {size}")
    if any(block <= 0 or block % world for block in blocks):
        raise ValueError(f"fused block sizes {blocks} are not each a positive multiple of the tensor size {world}")
    return blocks


def shard_ranges(full_size: int, rank: int, world: int, chunks: FusedChunks = 1,
                 padded_size: int | None = None) -> tuple[list[tuple[int, int]], int]:
    """The one rule for which part of a sharded dimension a rank holds: the dimension (``full_size``, padded
    with zeros to ``padded_size`` for a vocabulary) is cut into the blocks ``chunks`` names (``fused_blocks``:
    n equal ones, or the sizes given, e.g. q|k|v), and the rank holds its 1/``world`` of each, in block order.
    Returns the (start, stop) ranges of the full dimension to concatenate and the local size, which zeros fill
    up to where the ranges end before it. Block sizes (a tuple) are of the unpadded dimension: no padding."""
    size = padded_size or full_size
    if not isinstance(chunks, int) and size != full_size:
        raise ValueError(f"fused block sizes {tuple(chunks)} of a dimension of {full_size} padded to {size}: "
                         "only equal blocks are padded")
    ranges: list[tuple[int, int]] = []
    block_start = 0
    for block in fused_blocks(size, world, chunks):
        start = block_start + rank * (block // world)
        stop = min(start + block // world, full_size)
        if stop > start:
            ranges.append((start, stop))
        block_start += block
    return ranges, size // world


def take_shard(full: torch.Tensor, dim: int, rank: int, world: int, chunks: FusedChunks = 1,
               padded_size: int | None = None) -> torch.Tensor:
    """This rank's part of ``full`` along ``dim`` by ``shard_ranges`` (a copy)."""
    ranges, local = shard_ranges(full.shape[dim], rank, world, chunks, padded_size)
    return join_pieces([full.narrow(dim, start, stop - start) for start, stop in ranges], dim, local)


def join_pieces(pieces: list[torch.Tensor], dim: int, local_size: int) -> torch.Tensor:
    """The pieces ``shard_ranges`` names, concatenated along ``dim`` and zero-filled up to ``local_size``."""
    held = sum(piece.shape[dim] for piece in pieces)
    if held < local_size:
        pad_shape = list(pieces[0].shape)
        pad_shape[dim] = local_size - held
        pieces = [*pieces, pieces[0].new_zeros(pad_shape)]
    return torch.cat(pieces, dim=dim).contiguous()


def shard_rows(full: torch.Tensor, group: ProcessGroup | None, chunks: FusedChunks = 1,
               padded_rows: int | None = None) -> torch.Tensor:
    """This rank's rows of ``full`` (dim 0), by ``shard_ranges``."""
    rank, world = _rank_world(group)
    return take_shard(full, 0, rank, world, chunks, padded_rows)


class ColumnParallelLinear(nn.Module):
    """Y = XA + b with A split by columns, A = [A_1, ..., A_p]: rank i computes Y_i = X A_i + b_i.

    Input: replicated over the group. ``enter_region=True`` enters the region here (``parallel.region``:
    identity forward, all-reduce of dX backward; with ``sequence_parallel`` an all-gather of the sequence);
    set it False where the parent module already entered it (one all-reduce for q, k and v together).
    ``async_grad_reduce`` overlaps that backward collective with the weight-gradient GEMM.
    Output: Y_i (this rank's columns), or the full Y with ``gather_output``. ``fused_chunks``: the output is
    fused from blocks (``FusedChunks``: q|k|v, equal or of given sizes), each split over the ranks on its own;
    Y_i is this rank's part of each block, concatenated in block order (``shard_ranges``).
    """

    weight_grad_store: WeightGradStore | None = None  # set by a zero-bubble schedule: dW waits for its W pass

    def __init__(self, in_features: int, out_features: int, *, group: ProcessGroup | None, bias: bool = True,
                 gather_output: bool = False, enter_region: bool = True, sequence_parallel: bool = False,
                 async_grad_reduce: bool = False, fused_chunks: FusedChunks = 1, dtype: torch.dtype | None = None):
        super().__init__()
        rank, world = _rank_world(group)
        fused_blocks(out_features, world, fused_chunks)  # ValueError unless each block divides by the tensor size
        self.group, self.gather_output = group, gather_output
        self.entry = RegionEntry(group, [self], sequence_parallel, async_grad_reduce) if enter_region else None
        self.in_features, self.out_features = in_features, out_features
        local = out_features // world
        self.weight = nn.Parameter(torch.empty(local, in_features, dtype=dtype))
        mark_sharded(self.weight, 0, out_features, fused_chunks)
        if bias:
            self.bias = nn.Parameter(torch.zeros(local, dtype=dtype))
            mark_sharded(self.bias, 0, out_features, fused_chunks)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, group: ProcessGroup | None,
                   fused_chunks: FusedChunks = 1, **kwargs: Any) -> "ColumnParallelLinear":
        out_features, in_features = weight.shape
        with torch.device(weight.device):
            layer = cls(in_features, out_features, group=group, bias=bias is not None, fused_chunks=fused_chunks,
                        dtype=weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(shard_rows(weight, group, fused_chunks))
            if bias is not None:
                layer.bias.copy_(shard_rows(bias, group, fused_chunks))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.entry is not None:
            x = self.entry(x)
        y = column_linear(x, self.weight, self.bias, self.weight_grad_store)
        return gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = XA + b with A split by rows, A = [A_1; ...; A_p] and X = [X_1, ..., X_p] split by columns:
    rank i computes X_i A_i; the partial sums are all-reduced (reduce-scattered over the sequence with
    ``sequence_parallel``), then b (replicated) is added once.
    """

    weight_grad_store: WeightGradStore | None = None  # as ColumnParallelLinear's

    def __init__(self, in_features: int, out_features: int, *, group: ProcessGroup | None, bias: bool = True,
                 sequence_parallel: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        rank, world = _rank_world(group)
        if in_features % world:
            raise ValueError(f"in_features={in_features} is not divisible by tensor size {world}")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // world, dtype=dtype))
        mark_sharded(self.weight, 1, in_features)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, group: ProcessGroup | None,
                   **kwargs: Any) -> "RowParallelLinear":
        out_features, in_features = weight.shape
        with torch.device(weight.device):
            layer = cls(in_features, out_features, group=group, bias=bias is not None, dtype=weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(shard_rows(weight.t(), group).t())
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = linear(x, self.weight, None, self.weight_grad_store)
        y = (reduce_scatter_to_sequence_parallel_region(partial, self.group) if self.sequence_parallel
             else reduce_from_tensor_parallel_region(partial, self.group))
        return y if self.bias is None else y + self.bias


def padded_vocab_size(vocab_size: int, world: int) -> int:
    return -(-vocab_size // world) * world


class VocabParallelEmbedding(nn.Module):
    """E = onehot(ids) W with W split by rows (vocabulary): rank i holds rows [start_i, end_i), looks up
    the ids it owns, zeros the others, and the partial embeddings are all-reduced. A vocabulary that does
    not divide the group size is padded with zero rows that no id reaches."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group: ProcessGroup | None,
                 dtype: torch.dtype | None = None, padding_idx: int | None = None):
        super().__init__()
        rank, world = _rank_world(group)
        self.group, self.num_embeddings, self.embedding_dim = group, num_embeddings, embedding_dim
        self.padding_idx = padding_idx  # as nn.Embedding: that row gets no gradient
        self.padded_num_embeddings = padded_vocab_size(num_embeddings, world)
        self.per_rank = self.padded_num_embeddings // world
        self.vocab_start = rank * self.per_rank
        self.vocab_end = self.vocab_start + self.per_rank
        self.valid_rows = max(0, min(self.vocab_end, num_embeddings) - self.vocab_start)
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim, dtype=dtype))
        mark_sharded(self.weight, 0, num_embeddings)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, *, group: ProcessGroup | None,
                   padding_idx: int | None = None) -> "VocabParallelEmbedding":
        with torch.device(weight.device):
            layer = cls(weight.shape[0], weight.shape[1], group=group, dtype=weight.dtype, padding_idx=padding_idx)
        with torch.no_grad():
            layer.weight.copy_(shard_rows(weight, group, padded_rows=layer.padded_num_embeddings))
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        local_padding = None
        if self.padding_idx is not None and self.vocab_start <= self.padding_idx < self.vocab_end:
            local_padding = self.padding_idx - self.vocab_start
        out = F.embedding(local, self.weight, padding_idx=local_padding).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.group)


class VocabParallelHead(ColumnParallelLinear):
    """The output projection over a vocabulary split like ``VocabParallelEmbedding`` (same padding), so
    tied input/output embeddings share one sharded weight. Produces this rank's logits only; the loss is
    ``parallel.cross_entropy.vocab_parallel_cross_entropy`` and never gathers the full vocabulary."""

    def __init__(self, in_features: int, vocab_size: int, *, group: ProcessGroup | None, bias: bool = False,
                 dtype: torch.dtype | None = None, **kwargs: Any):
        rank, world = _rank_world(group)
        padded = padded_vocab_size(vocab_size, world)
        super().__init__(in_features, padded, group=group, bias=bias, dtype=dtype, **kwargs)
        self.vocab_size = vocab_size
        self.vocab_start = rank * (padded // world)
        self.valid_rows = max(0, min(self.vocab_start + padded // world, vocab_size) - self.vocab_start)
        for param in (self.weight, self.bias):
            if param is not None:
                mark_sharded(param, 0, vocab_size, fused_chunks=1)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, group: ProcessGroup | None,
                   **kwargs: Any) -> "VocabParallelHead":
        with torch.device(weight.device):
            layer = cls(weight.shape[1], weight.shape[0], group=group, bias=bias is not None, dtype=weight.dtype,
                        **kwargs)
        padded = layer.out_features
        with torch.no_grad():
            layer.weight.copy_(shard_rows(weight, group, padded_rows=padded))
            if bias is not None:
                layer.bias.copy_(shard_rows(bias, group, padded_rows=padded))
        return layer
