"""Work that only rank 0 does, without leaving the other ranks waiting if it fails."""

from __future__ import annotations

import pickle
from typing import Any, Callable

import torch.distributed as dist


def on_rank0(fn: Callable[[], Any], what: str, others: Callable[[], Any] | None = None) -> Any:
    """Run ``fn`` on rank 0 and return its result there (None elsewhere; the other ranks run ``others`` meanwhile,
    e.g. their side of the collectives ``fn`` takes part in). If it fails, every rank raises (rank 0 its own
    error, the others one quoting it) instead of waiting forever at the next collective."""
    error, result = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, on every rank
            error = exc
    elif others is not None:
        others()
    message = [_portable(error)]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if isinstance(message[0], Exception):
        raise message[0]  # the same error, so every rank reports it alike
    if message[0] is not None:
        raise RuntimeError(f"{what} failed on rank 0: {message[0]}")
    return result


def on_every_rank(fn: Callable[[], Any], what: str) -> list[Any]:
    """Run ``fn`` on every rank and return every rank's (small, picklable) result, in rank order, on every rank.
    If it fails anywhere, every rank raises: the failed ranks their own error, the others the first failed
    rank's (the same exception where it pickles, so a ``CheckpointError`` stays one; else one quoting it).
    The exchange of outcomes is the only wait between ranks."""
    error, result = None, None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, on every rank
        error = exc
    outcomes: list[tuple[Any, Any]] = [(None, None)] * dist.get_world_size()
    dist.all_gather_object(outcomes, (_portable(error), None if error is not None else result))
    if error is not None:
        raise error
    failed = next(((rank, err) for rank, (err, _) in enumerate(outcomes) if err is not None), None)
    if failed is not None:
        rank, err = failed
        raise err if isinstance(err, Exception) else RuntimeError(f"{what} failed on rank {rank}: {err}")
    return [value for _, value in outcomes]


def _portable(error: Exception | None):
    """The exception itself if it survives pickling (to re-raise elsewhere), else its text."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # an exception holding unpicklable state
        return f"{type(error).__name__}: {error}"


def rank0_first(fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on rank 0 (which fills caches), then on the other ranks."""
    result = on_rank0(fn, what)
    return fn() if dist.get_rank() != 0 else result
