"""Megatron's model-parallel RNG for dropout under tensor parallelism.

Dropout on data that the tensor-parallel ranks split (this rank's attention heads, a sharded MLP activation,
a sequence-parallel chunk) draws from a generator state of this rank's own (seed + 2718 + tensor rank, as
Megatron's ``model_parallel_cuda_manual_seed``), so two ranks never draw the same mask for different data, as
one process would not. Dropout on data every rank of the group holds whole keeps the default generator, which
every rank seeds alike, so the masks agree.

``install`` marks the split spans with module hooks, which run again when a checkpointed block is recomputed:
from the first column-parallel layer of a region to its row-parallel layer (attention probabilities, the
activation between the MLP's two layers), and, with sequence parallelism, around every ``nn.Dropout`` of the
blocks (their hidden states are sequence chunks). ``checkpoint_contexts`` gives the recomputation the state
the forward started from.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

SEED_OFFSET = 2718  # Megatron's tensor-model-parallel seed offset


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class TensorParallelRNG:
    """The generator state of this tensor-parallel rank, swapped into the device's default generator while
    a split span runs (``enter`` / ``exit``)."""

    def __init__(self, seed: int, tp_rank: int, device: torch.device):
        self.device = torch.device(device)
        generator = torch.Generator(self.device)
        generator.manual_seed(seed + SEED_OFFSET + tp_rank)
        self._state = generator.get_state()
        self._outer: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self._outer is not None

    def enter(self) -> bool:
        """Swap this rank's state in; False if a span is already open (spans do not nest)."""
        if self.active:
            return False
        self._outer = _get_state(self.device)
        _set_state(self.device, self._state)
        return True

    def exit(self) -> None:
        if self._outer is not None:  # active
            self._state = _get_state(self.device)
            _set_state(self.device, self._outer)
            self._outer = None

    def state(self) -> torch.Tensor:
        return self._state.clone()

    def load_state(self, state: torch.Tensor) -> None:
        self._state = state.clone()

    def checkpoint_contexts(self):
        """``context_fn`` for ``torch.utils.checkpoint``: the recomputation draws from the state the forward
        started from, and leaves the state where the forward left it."""
        start = {}

        @contextmanager
        def forward():
            start["state"] = self._state.clone()
            yield

        @contextmanager
        def recompute():
            after_forward, self._state = self._state, start["state"].clone()
            try:
                yield
            finally:
                # the recomputation may stop early, inside a span: the checkpoint restores the default
                # generator itself (its fork_rng encloses this context)
                self._outer = None
                self._state = after_forward

        return forward(), recompute()


def install(model: nn.Module, rng: TensorParallelRNG, sequence_parallel_blocks: nn.Module | None) -> None:
    """Hook the split spans of the tensor-parallel ``model`` (see the module's docstring); with sequence
    parallelism also the ``nn.Dropout`` modules of its blocks."""
    from parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelHead

    def open_span(module, args):
        rng.enter()

    def close_span(module, args, output):
        rng.exit()

    def open_dropout(module, args):
        module.opened_rng_span = rng.enter()

    def close_dropout(module, args, output):
        if module.opened_rng_span:
            rng.exit()

    for module in model.modules():
        if isinstance(module, ColumnParallelLinear) and not isinstance(module, VocabParallelHead):
            module.register_forward_pre_hook(open_span)
        elif isinstance(module, RowParallelLinear):
            module.register_forward_hook(close_span)
    if sequence_parallel_blocks is not None:
        for module in sequence_parallel_blocks.modules():
            if isinstance(module, nn.Dropout):
                module.register_forward_pre_hook(open_dropout)
                module.register_forward_hook(close_dropout)
