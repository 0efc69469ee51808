"""Dropless expert parallelism: token-expert pairs go to the rank holding their expert by all-to-all, are computed
there, come back by the inverse all-to-all and are combined with the router's weights.

The experts of a layer are split over the expert-parallel group in equal contiguous blocks (rank r holds experts
``r * local .. (r + 1) * local - 1``, Megatron's and DeepSpeed's placement). No capacity factor: every pair is
computed, so the layer's output equals one process's. The split sizes of the variable all-to-all are read on
the host once per layer call (as Megatron-Core's all-to-all dispatcher does); nothing else syncs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

# (tokens routed to this rank's experts (R, hidden), their local expert index (R,)) -> expert outputs (R, hidden)
LocalExperts = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with given split sizes; its gradient is the inverse exchange."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: ProcessGroup | None) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return exchange(tensor, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        output_splits, input_splits = ctx.splits
        return exchange(grad, input_splits, output_splits, ctx.group), None, None, None


def exchange(tensor: torch.Tensor, output_splits: list[int], input_splits: list[int],
             group: ProcessGroup | None) -> torch.Tensor:
    """Rows ``input_splits[j]`` of ``tensor`` to rank j of ``group``; rows ``output_splits[j]`` from it."""
    output = tensor.new_empty((sum(output_splits), *tensor.shape[1:]))
    dist.all_to_all_single(output, tensor.contiguous(), output_splits, input_splits, group=group)
    return output


@dataclass(frozen=True)
class Dispatch:
    """Where this rank's token-expert pairs go: ``order`` sorts the flat pairs by expert; ``send`` / ``receive``
    rows per rank of the group; ``local_expert`` of each received row (grouped by source rank, then expert)."""

    order: torch.Tensor
    send: list[int]
    receive: list[int]
    local_expert: torch.Tensor


def plan_dispatch(expert_index: torch.Tensor, num_experts: int, group: ProcessGroup | None) -> Dispatch:
    """The ``Dispatch`` of the flat expert choices ``expert_index`` (one per token-expert pair). Collective over
    ``group``: each rank learns how many rows it receives per source rank and local expert."""
    world = dist.get_world_size(group)
    local = num_experts // world
    if expert_index.is_meta:  # bench plan traces shapes only: an even exchange, every rank receiving what it sends
        return _even_dispatch(expert_index, local, world)
    order = torch.argsort(expert_index, stable=True)
    per_expert = torch.bincount(expert_index, minlength=num_experts)
    received = torch.empty_like(per_expert)
    dist.all_to_all_single(received, per_expert, group=group)  # [source rank, local expert]
    counts = torch.stack([per_expert.view(world, local).sum(1), received.view(world, local).sum(1)])
    send, receive = counts.tolist()  # the one host read: split sizes of the variable all-to-all
    experts = torch.arange(local, device=expert_index.device).repeat(world)
    return Dispatch(order, send, receive, torch.repeat_interleave(experts, received))


def _even_dispatch(expert_index: torch.Tensor, local: int, world: int) -> Dispatch:
    pairs = expert_index.numel()
    send = [pairs // world + (rank < pairs % world) for rank in range(world)]
    rows = torch.arange(pairs, device=expert_index.device)
    return Dispatch(rows, send, send, rows % local)


def expert_parallel(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    num_experts: int, group: ProcessGroup | None, compute: LocalExperts) -> torch.Tensor:
    """The routed experts' output for ``hidden`` (tokens, hidden): each token's ``top_k_index`` experts (of
    ``num_experts`` over ``group``) computed where they live by ``compute``, weighted by ``top_k_weights`` and
    summed per token in top-k order (transformers' grouped kernels' order)."""
    tokens, top_k = top_k_index.shape
    dispatch = plan_dispatch(top_k_index.reshape(-1), num_experts, group)
    sent = hidden[dispatch.order // top_k]
    received = _AllToAll.apply(sent, dispatch.receive, dispatch.send, group)
    computed = compute(received, dispatch.local_expert)
    returned = _AllToAll.apply(computed, dispatch.send, dispatch.receive, group)
    unsorted = returned[torch.argsort(dispatch.order)]
    # in the router weights' dtype (fp32 for Mixtral's router, whatever the activations): as the grouped kernels
    weighted = unsorted.view(tokens, top_k, -1) * top_k_weights.unsqueeze(-1)
    return weighted.sum(dim=1).to(hidden.dtype)
