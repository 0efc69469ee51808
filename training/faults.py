"""What the step loop does when something goes wrong: stop signals, non-finite steps, stalled collectives.

Every decision here is taken by all ranks together, so no rank goes on alone into a collective the others
have left.
"""

from __future__ import annotations

import logging
import re
import signal
import threading

import torch
import torch.distributed as dist

from parallel.p2p import PipelineTimeout

log = logging.getLogger("colonnade")


class TrainingStopped(RuntimeError):
    """The run ended early on purpose (a stop signal, too many non-finite steps); ``exit_code`` for the shell."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within ``parallel.timeout_s``."""


class PeerLost(RuntimeError):
    """Another rank's process or node went away while this rank communicated with it."""


class StopSignals:
    """SIGTERM / SIGINT set a flag instead of killing the process; ``requested()`` is agreed by all ranks
    (one all-reduce), so every rank finishes the same step, saves, and stops. A second SIGINT interrupts at
    once. Installed only in the main thread; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if not dist.is_initialized() or dist.get_rank() == 0:  # every rank gets the signal; one says so
            log.warning("colonnade: %s received; finishing the current step, then saving a checkpoint",
                        signal.Signals(signum).name)

    def requested(self) -> int | None:
        """The signal any rank received (the same answer on every rank), or None. Collective."""
        from parallel.comm import comm_device

        flag = torch.tensor([float(self.received or 0)], device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


class NonFiniteSteps:
    """Counts optimizer steps skipped for a non-finite loss or gradient (the optimizers skip them on every
    rank together); ``limit`` consecutive ones end the run."""

    def __init__(self, limit: int, skipped_before: int = 0):
        self.limit = limit
        self.total = skipped_before
        self.consecutive = 0

    def record(self, step: int, applied: bool, loss: float, grad_norm: float | None) -> None:
        if applied:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        log.warning("colonnade: step %d skipped: non-finite loss or gradient (loss %s, grad norm %s); weights, "
                    "optimizer state and LR schedule unchanged (%d consecutive, %d in total)",
                    step, loss, grad_norm, self.consecutive, self.total)
        if self.consecutive >= self.limit:
            raise TrainingStopped(
                f"stopping at step {step}: {self.consecutive} consecutive steps had a non-finite loss or gradient "
                f"(train.max_consecutive_skips={self.limit}); the weights are those of the last good step. Lower "
                f"optim.lr, check the data, or resume from an earlier checkpoint", exit_code=3)


def is_timeout(exc: BaseException) -> bool:
    """A collective's timeout as gloo / NCCL / the store raise it, or a pipeline receive's (not our own errors,
    whose paths may say anything)."""
    if isinstance(exc, PipelineTimeout):
        return True
    if isinstance(exc, (TrainingStopped, CollectiveTimeout)) or not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return "timed out" in text or "timeout after" in text or "timeout(ms)" in text


# What gloo and NCCL say when the other end of a connection is gone.
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "communicator was aborted",
              "remote process exited")


def is_peer_lost(exc: BaseException) -> bool:
    return (isinstance(exc, RuntimeError) and not isinstance(exc, (TrainingStopped, CollectiveTimeout, PeerLost))
            and any(phrase in str(exc).lower() for phrase in _PEER_GONE))


def peer_lost_error(exc: BaseException, rank: int, operation: str) -> PeerLost:
    """One line for the lost peer (gloo's message names its address) instead of the library's traceback."""
    address = re.search(r"\[([0-9A-Za-z.:_-]+)\]:(\d+)", str(exc))
    peer = f"the peer at {address.group(1)}:{address.group(2)}" if address else "a peer"
    return PeerLost(f"rank {rank}: lost the connection to {peer} during {operation}: another rank's process or "
                    f"node is gone (its own log says why). Under torchrun --max-restarts the job restarts from the "
                    f"newest complete checkpoint; otherwise resume with --set train.resume=auto")


def timeout_error(exc: BaseException, rank: int, timeout_s: float, operation: str) -> CollectiveTimeout:
    """The timeout named: what this rank was doing, and the flight recorder's verdict on who is behind (every
    live rank reaches the same one)."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, PipelineTimeout):
        return CollectiveTimeout(f"rank {rank}: {first_line}, during {operation}. {_who_is_behind(timeout_s)}. "
                                 f"Raise parallel.p2p_timeout_s if stages are legitimately this slow")
    return CollectiveTimeout(
        f"rank {rank}: a collective did not complete within parallel.timeout_s={timeout_s:g} s during {operation} "
        f"({first_line}). {_who_is_behind(timeout_s)}. Raise parallel.timeout_s if steps are legitimately this slow")


def _who_is_behind(timeout_s: float) -> str:
    from parallel import flight

    recorder = flight.installed()
    if recorder is None:
        return "Another rank is stalled or gone; check its log"
    try:
        reports = flight.exchange(recorder, wait_s=min(timeout_s, 30.0))
    except Exception as exc:  # the rendezvous store went with the rank that hosted it
        return f"Another rank is stalled or gone (no flight records: {type(exc).__name__}); check its log"
    return f"Flight recorder: {flight.verdict(reports, dist.get_world_size())}"


def timeout_reported(wait_s: float = 10.0) -> None:
    """After this rank printed its timeout error: wait (bounded) for the other ranks that exchanged flight
    records to print theirs before exiting. Without it a loaded machine showed the launcher killing rank 1 a
    moment before it printed."""
    from parallel import flight

    recorder = flight.installed()
    if recorder is None or not recorder.reporters:
        return
    try:
        flight.await_printed(recorder, wait_s)
    except Exception:  # the store is gone: nothing left to wait for
        pass

