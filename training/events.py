"""What a run tells the code that watches it (bench's memory, sweep, async-save and divergence commands; tests):
the run's parts once they are built, and the start and end of each phase. Observers are passed to
``training.run(cfg, observers=[...])``; they read, they do not steer (an exception in one ends the run, as it
would anywhere else in the process).

Phases, in the order a run meets them (``step`` is the optimizer step the phase belongs to, from 1; 0 before
the first):

    load       the model built and placed, its weights read, the DeepSpeed engine made
    resume     a checkpoint's weights and optimizer state restored (only when the run resumes)
    train      the step loop, from the evaluation before step 1 (``train.eval_first``) or the first step to the
               last save written (background saves included)
    step       one training step: every micro-batch's forward and backward, the reduction, the optimizer step
    optimizer  inside ``step``: the optimizer step that applies the reduced gradients
    eval       one evaluation over the validation data
    save       one checkpoint save (with ``train.async_save``: the copy to host memory and any wait)
    export     the final Hugging Face export
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

PHASES = ("load", "resume", "train", "step", "optimizer", "eval", "save", "export")


@dataclass(frozen=True)
class BuiltRun:
    """The parts of a run, as ``on_built`` receives them once the run is assembled (after any resume, before the
    first step)."""

    cfg: Any            # training.config.RunConfig
    model: Any          # this rank's HF model object (its tensor-parallel shard; with pipelines, the whole
                        # meta-shaped model whose chunks this rank trains)
    engine: Any         # the DeepSpeed engine over this rank's parameters
    groups: Any         # parallel.groups.ProcessGroups
    batches: Any        # training.data.TrainBatches: ``batch(step, micro)`` is what the step trains on
    step: Any           # the run's training.steps.Step (data-parallel or pipeline)


class Observer:
    """Override what you need; every hook here does nothing."""

    def on_built(self, run: BuiltRun) -> None:
        pass

    def on_phase_start(self, phase: str, step: int) -> None:
        pass

    def on_phase_end(self, phase: str, step: int, record: dict[str, Any] | None) -> None:
        """``record``: for ``step``, the step's logged values (loss, grad_norm, lr, step_time_s, ...); for
        ``eval``, the metrics; otherwise None."""


class Observers:
    """The run's observers, told of each event in the order they were given."""

    def __init__(self, observers: Iterable[Observer] = ()):
        self._observers = list(observers)

    def built(self, run: BuiltRun) -> None:
        for observer in self._observers:
            observer.on_built(run)

    def start(self, phase: str, step: int) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; the phases are {', '.join(PHASES)}")
        for observer in self._observers:
            observer.on_phase_start(phase, step)

    def end(self, phase: str, step: int, record: dict[str, Any] | None = None) -> None:
        for observer in self._observers:
            observer.on_phase_end(phase, step, record)

    @contextlib.contextmanager
    def phase(self, phase: str, step: int) -> Iterator[None]:
        """``start`` and ``end`` around the block (``end`` only if the block completes)."""
        self.start(phase, step)
        yield
        self.end(phase, step)
