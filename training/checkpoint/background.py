"""``train.async_save``: at most one checkpoint written by a thread while the step loop goes on.

The step loop copies its rank's state to host memory at a step boundary (``checkpoint.save``) and hands the
writing to ``BackgroundSave.start``; each rank's thread writes and fsyncs its file and leaves a marker in the
staging directory; rank 0's thread then waits for every rank's marker and commits (index, manifest, rename).
The thread takes part in no collective, so it never races the step loop's. Until the commit the staging
directory is incomplete: a crash leaves the previous checkpoint the newest complete one.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from training.checkpoint import files
from training.checkpoint.files import CheckpointError
from training.rank0 import on_every_rank


def _marker(staging: Path, rank: int, outcome: str) -> Path:
    return staging / f".rank-{rank:05d}.{outcome}"


def report_written(staging: Path, rank: int, file: str, entry: dict[str, Any]) -> None:
    """This rank's file is on disk: its manifest entry, for rank 0's commit."""
    files.write_text_atomic(_marker(staging, rank, "written"), json.dumps({file: entry}))


def report_failed(staging: Path, rank: int, error: BaseException) -> None:
    try:
        files.write_text_atomic(_marker(staging, rank, "failed"), f"{type(error).__name__}: {error}")
    except OSError:
        pass  # rank 0 then names this rank when its wait times out


def await_ranks(staging: Path, world: int, timeout_s: float, poll_s: float = 0.05) -> dict[str, dict[str, Any]]:
    """Rank 0's thread: every rank's manifest entry once all have written (markers removed), or an error
    naming the rank that failed or did not finish within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pending = set(range(world))
    while pending:
        for rank in sorted(pending):
            failed = _marker(staging, rank, "failed")
            if failed.is_file():
                raise CheckpointError(f"rank {rank} could not write its part of {staging.name}: {failed.read_text()}")
            if _marker(staging, rank, "written").is_file():
                pending.discard(rank)
        if pending and time.monotonic() > deadline:
            raise CheckpointError(f"ranks {sorted(pending)} did not write their part of {staging.name} within "
                                  f"parallel.timeout_s={timeout_s:g}s")
        if pending:
            time.sleep(poll_s)
    written = {}
    for rank in range(world):
        marker = _marker(staging, rank, "written")
        written.update(json.loads(marker.read_text()))
        marker.unlink()
    return written


class BackgroundSave:
    """One checkpoint write at a time in a thread; ``wait`` (collective, at the same step boundary on every
    rank) ends it and raises on every rank if it failed on any."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._step: int | None = None

    @property
    def in_flight(self) -> int | None:
        """The step whose checkpoint is being written, or None."""
        return self._step

    def start(self, step: int, write: Callable[[], None]) -> None:
        if self._thread is not None:
            raise RuntimeError(f"the checkpoint of step {self._step} is still being written; wait() first")
        self._error, self._step = None, step
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"checkpoint-step-{step}", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as exc:  # re-raised on every rank by wait()
            self._error = exc

    def wait(self) -> int | None:
        """Block until the save in flight is committed; returns its step (None if there was none)."""
        if self._thread is None:
            return None
        self._thread.join()
        error, step = self._error, self._step
        self._thread, self._error, self._step = None, None, None

        def outcome() -> None:
            if error is not None:
                raise error

        on_every_rank(outcome, f"writing the checkpoint of step {step} in the background (rank {dist.get_rank()})")
        return step
