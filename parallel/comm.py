"""Tensor-parallel communication as autograd functions (after Megatron-LM ``tensor_parallel/mappings.py``).

Three tiers: private collectives on a group; private ``autograd.Function`` s pairing each forward with its
dual in backward; the public functions below, each documented "forward: X, backward: Y". Every function is
the identity when the group has a single rank, so TP=1 costs nothing and issues no collective.

Tensors are Hugging Face layout ``(batch, seq, hidden)``: "last dim" is the hidden / vocab dim that tensor
parallelism splits; the sequence-parallel functions split the sequence dim (1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

SEQ_DIM = 1


def comm_device(group: ProcessGroup | None = None) -> torch.device:
    """The device the collectives of ``group`` run on: the current CUDA device under NCCL, the CPU under gloo.
    Every tensor colonnade hands to a collective or a p2p operation is made here (or is the model's own)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def start_all_reduce(x: torch.Tensor, group: ProcessGroup | None,
                     op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> tuple[torch.Tensor, dist.Work]:
    """Launch a reduction over ``group`` (in place on a contiguous ``x``); read the result after ``work.wait()``."""
    x = x.contiguous()
    return x, dist.all_reduce(x, op=op, group=group, async_op=True)


def all_reduce(x: torch.Tensor, group: ProcessGroup | None,
               op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """Plain (non-autograd) reduction over ``group``, in place on a contiguous ``x``; returns the result (``x``
    itself on a group of one or none)."""
    if _world(group) == 1:
        return x
    x, work = start_all_reduce(x, group, op)
    work.wait()
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {world}")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def all_gather_along(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    stacked = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(stacked, x.contiguous(), group=group)
    if dim == 0:
        return stacked
    return torch.cat(stacked.chunk(world), dim=dim)


def start_reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> tuple[torch.Tensor, dist.Work]:
    """Launch the sum over ``group`` of ``x`` keeping this rank's chunk of ``dim``; read it after ``work.wait()``."""
    world = _world(group)
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {world}")
    stacked = x.contiguous() if dim == 0 else torch.cat(x.chunk(world, dim=dim), dim=0)
    out = torch.empty((stacked.shape[0] // world, *stacked.shape[1:]), dtype=x.dtype, device=x.device)
    return out, dist.reduce_scatter_tensor(out, stacked, group=group, async_op=True)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    if _world(group) == 1:
        return x
    out, work = start_reduce_scatter(x, dim, group)
    work.wait()
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumOverRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous().clone(), ctx.group), None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, ctx.dim, ctx.group), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather_along(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_along(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, SEQ_DIM, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, SEQ_DIM, ctx.group), None


def _skip(group) -> bool:
    return _world(group) == 1


def copy_to_tensor_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce (sum) over ``group``."""
    return x if _skip(group) else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Forward: all-reduce (sum) over ``group``. Backward: identity."""
    return x if _skip(group) else _ReduceFromRegion.apply(x, group)


def sum_over_tensor_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Forward: all-reduce (sum) over ``group``. Backward: all-reduce (sum). For a statistic every rank computes
    from its part and then uses itself (a norm's sum of squares over a split width)."""
    return x if _skip(group) else _SumOverRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: ProcessGroup | None, dim: int = -1) -> torch.Tensor:
    """Forward: keep this rank's chunk of ``dim``. Backward: all-gather along ``dim``."""
    return x if _skip(group) else _ScatterToRegion.apply(x, group, dim)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: ProcessGroup | None, dim: int = -1) -> torch.Tensor:
    """Forward: all-gather along ``dim``. Backward: keep this rank's chunk."""
    return x if _skip(group) else _GatherFromRegion.apply(x, group, dim)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Forward: keep this rank's chunk of the sequence. Backward: all-gather the sequence."""
    return x if _skip(group) else _ScatterToRegion.apply(x, group, SEQ_DIM)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Forward: all-gather the sequence. Backward: reduce-scatter the sequence."""
    return x if _skip(group) else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Forward: reduce-scatter the sequence (sum partial results, keep this rank's chunk).
    Backward: all-gather the sequence."""
    return x if _skip(group) else _ReduceScatterToSequence.apply(x, group)
