"""Where activations enter the tensor-parallel region, and the overlap of its backward collective.

Forward, an entry is the identity (with sequence parallelism: the all-gather of the sequence). Backward, it sums
the input gradient over the tensor group (with sequence parallelism: reduce-scatters it), because each rank's
column-parallel layers produced only their part of it.

With ``overlap`` (Megatron's asynchronous tensor-parallel all-reduce) the entry also owns the weight gradients
of the column-parallel layers that read its output: those layers compute only their input gradient, the entry
launches the collective on the summed input gradient, computes the weight gradients (one GEMM per layer, the
same ``dY^T X`` autograd would do) while it runs, and then waits. With sequence parallelism it keeps only this
rank's part of the sequence for that and gathers it again in the backward (Megatron does the same). The weight
gradients still leave through autograd (the weights are inputs of the entry), so gradient hooks such as DeepSpeed's
fire as usual, and a fused q|k|v or gate|up needs one collective, not one per layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from parallel.comm import (
    SEQ_DIM,
    all_gather_along,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    start_all_reduce,
    start_reduce_scatter,
)
from parallel.weight_grad import WeightGradStore, linear, weight_gradient


class _PendingWeightGrads:
    """The output gradients the column layers of one entry call left for it, by weight."""

    def __init__(self, weights: list[torch.Tensor]):
        self.weight_ids = {id(w) for w in weights}
        self.grad_outputs: dict[int, list[torch.Tensor]] = {}

    def owns(self, weight: torch.Tensor) -> bool:
        return id(weight) in self.weight_ids

    def add(self, weight_id: int, grad_output: torch.Tensor) -> None:
        self.grad_outputs.setdefault(weight_id, []).append(grad_output)

    def weight_grad(self, weight: torch.Tensor, entered: torch.Tensor) -> torch.Tensor | None:
        total = None
        for grad_output in self.grad_outputs.pop(id(weight), []):
            dw = weight_gradient(entered, grad_output)
            total = dw if total is None else total + dw
        return total


class _OverlappedEntry(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pending, group, sequence_parallel, *weights):
        ctx.pending, ctx.group, ctx.sequence_parallel = pending, group, sequence_parallel
        ctx.weights = weights  # parameters: alive for the whole step anyway
        # With sequence parallelism only this rank's part of the sequence is kept for the backward, which
        # gathers it again (Megatron's trade: one more all-gather for 1/tensor of the bytes held)
        ctx.save_for_backward(x)
        return all_gather_along(x, SEQ_DIM, group) if sequence_parallel else x

    @staticmethod
    def backward(ctx, grad):
        (entered,) = ctx.saved_tensors
        if ctx.sequence_parallel:
            entered = all_gather_along(entered, SEQ_DIM, ctx.group)
            grad_input, work = start_reduce_scatter(grad, SEQ_DIM, ctx.group)
        else:
            grad_input, work = start_all_reduce(grad, ctx.group)
        weight_grads = [ctx.pending.weight_grad(w, entered) if needed else None
                        for w, needed in zip(ctx.weights, ctx.needs_input_grad[4:])]
        work.wait()
        return (grad_input, None, None, None, *weight_grads)


class _LinearWithDeferredWeightGrad(torch.autograd.Function):
    """Y = X W^T + b whose backward gives dX and db and leaves dY for the entry to compute dW."""

    @staticmethod
    def forward(ctx, x, weight, bias, pending, weight_id):
        ctx.pending, ctx.weight_id, ctx.has_bias = pending, weight_id, bias is not None
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        ctx.pending.add(ctx.weight_id, grad_output)
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_output @ weight, None, grad_bias, None, None


class RegionEntry:
    """Enter the tensor-parallel region of ``group`` before the column-parallel ``layers`` (read lazily: tied
    weights are swapped after construction)."""

    def __init__(self, group: ProcessGroup | None, layers: list, sequence_parallel: bool = False,
                 overlap: bool = False):
        self.group, self.layers = group, layers
        self.sequence_parallel, self.overlap = sequence_parallel, overlap

    def weights_wait_for_w(self) -> bool:
        """Under a zero-bubble schedule the W op computes these layers' weight gradients: no GEMM is left in the
        backward to overlap the collective with."""
        return any(getattr(layer, "weight_grad_store", None) is not None for layer in self.layers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is None or dist.get_world_size(self.group) == 1:
            return x
        if not (self.overlap and torch.is_grad_enabled()) or self.weights_wait_for_w():
            return (gather_from_sequence_parallel_region(x, self.group) if self.sequence_parallel
                    else copy_to_tensor_parallel_region(x, self.group))
        weights = [layer.weight for layer in self.layers]
        pending = _PendingWeightGrads(weights)
        entered = _OverlappedEntry.apply(x, pending, self.group, self.sequence_parallel, *weights)
        entered.tp_pending_weight_grads = pending
        return entered


def column_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  store: WeightGradStore | None = None) -> torch.Tensor:
    """F.linear, leaving the weight gradient to the entry that ``x`` came out of, if it owns ``weight``, else
    to ``store`` (a zero-bubble schedule's W pass) if one is given."""
    pending = getattr(x, "tp_pending_weight_grads", None)
    if pending is None or not pending.owns(weight) or not torch.is_grad_enabled():
        return linear(x, weight, bias, store)
    return _LinearWithDeferredWeightGrad.apply(x, weight.detach(), bias, pending, id(weight))
