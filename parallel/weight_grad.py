"""The backward split of zero-bubble schedules: input gradients now, weight gradients later.

A linear layer's backward is two GEMMs of the same cost: dX = dY W, which the previous pipeline stage waits
for, and dW = dY^T X, which nothing waits for. While a ``WeightGradStore`` is attached, ``linear`` computes
dX (and the bias gradient, a cheap sum) in backward and files (X, dY) under the key of the pass that is
running (``collecting``); ``take(key)`` later gives the weights and the function that turns those pairs into one
gradient per weight. The caller hands those gradients to the parameters (``training.pipeline`` computes and
hands them inside the engine's backward, so DeepSpeed's gradient hooks see them like any other gradient).

X and dY stay alive from the B pass to the W pass: the memory the schedule trades for the bubble.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def weight_gradient(x: torch.Tensor, grad_output: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """dW of Y = X W^T (``transposed``: Y = X W) from X and dY, the GEMM autograd would run."""
    x2d, dy2d = x.reshape(-1, x.shape[-1]), grad_output.reshape(-1, grad_output.shape[-1])
    return x2d.t() @ dy2d if transposed else dy2d.t() @ x2d


class WeightGradStore:
    """(weight, X, dY) triples filed by backward passes, by the key of the pass (chunk, micro-batch)."""

    def __init__(self):
        self._filing = None  # the key of the B pass running, if any
        self._pending: dict[object, list] = {}

    @contextmanager
    def collecting(self, key: Hashable):
        """File what the backward run inside this block leaves under ``key``."""
        self._filing = key
        try:
            yield
        finally:
            self._filing = None

    def file(self, weight: torch.nn.Parameter, x: torch.Tensor, grad_output: torch.Tensor, transposed: bool):
        if self._filing is None:
            raise RuntimeError("a deferred weight gradient outside WeightGradStore.collecting(): the schedule ran "
                               "a backward that is not a B pass")
        self._pending.setdefault(self._filing, []).append((weight, x, grad_output, transposed))

    def take(self, key: Hashable) -> tuple[list[torch.nn.Parameter], Callable[[], list[torch.Tensor]]]:
        """The weights the B pass ``key`` left gradients for, and the function that computes those gradients
        (one per weight, summed where a weight was used twice), to run where the W pass's time is counted."""
        filed = self._pending.pop(key, [])
        weights = list({id(weight): weight for weight, *_ in filed}.values())

        def gradients() -> list[torch.Tensor]:
            sums: dict[int, torch.Tensor] = {}
            for weight, x, grad_output, transposed in filed:
                dw = weight_gradient(x, grad_output, transposed)
                sums[id(weight)] = sums[id(weight)] + dw if id(weight) in sums else dw
            filed.clear()  # X and dY are free once their product is
            return [sums[id(weight)] for weight in weights]

        return weights, gradients

    def weight_grads(self, key: Hashable) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """``take``, computed at once: (weight, gradient) pairs."""
        weights, gradients = self.take(key)
        return list(zip(weights, gradients()))

    def pending(self) -> list:
        """The keys of B passes whose weight gradients no W pass has taken yet."""
        return list(self._pending)


class _DeferredLinear(torch.autograd.Function):
    """Y = X W^T + b (``transposed``: Y = X W + b, a weight stored (in, out)) whose backward returns dX and
    db and files (X, dY) for dW. The weight enters detached, so autograd gives it no gradient here."""

    @staticmethod
    def forward(ctx, x, detached_weight, bias, weight_in_a_tuple, store, transposed):
        (weight,) = weight_in_a_tuple  # in a tuple: an input of the Function would get (None) gradient hooks
        ctx.weight, ctx.store, ctx.transposed, ctx.has_bias = weight, store, transposed, bias is not None
        ctx.save_for_backward(x, detached_weight)
        w = detached_weight.t() if transposed else detached_weight
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, detached_weight = ctx.saved_tensors
        ctx.store.file(ctx.weight, x, grad_output, ctx.transposed)
        grad_input = grad_output @ (detached_weight.t() if ctx.transposed else detached_weight)
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_input, None, grad_bias, None, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           store: WeightGradStore | None = None, transposed: bool = False) -> torch.Tensor:
    """``F.linear`` (``transposed``: ``x @ weight + bias``), deferring the weight gradient to ``store`` when
    one is given and autograd records (an input that needs no gradient keeps the plain path)."""
    # the weight is no input of the deferring Function: it needs an input that autograd follows
    if store is None or not torch.is_grad_enabled() or not (weight.requires_grad and x.requires_grad):
        return F.linear(x, weight.t() if transposed else weight, bias)
    return _DeferredLinear.apply(x, weight.detach(), bias, (weight,), store, transposed)
