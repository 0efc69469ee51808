"""Measurements taken inside a training process: communication time and bytes per parallel group, and the
forward / backward / optimizer split of each step.

Collectives are timed by wrapping the ``torch.distributed`` functions (our layers, DeepSpeed and the loop all
call them through that module, so nothing is missed the way DeepSpeed's own comms logger misses direct
``torch.distributed`` calls); each call is attributed to tp / dp / pp / other by the ranks of its group,
computed from the same rank grid colonnade uses. Pipeline receives are timed in ``PipeComm``. On CPU (gloo)
a collective returns when done, so wall time is its cost, waiting for the slowest rank included.
"""

from __future__ import annotations

import time
from collections import defaultdict

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_gather_into_tensor", "reduce_scatter_tensor",
               "broadcast")


class StepProbe:
    """Accumulates seconds and bytes by category; ``snapshot`` / ``since`` give per-step deltas."""

    def __init__(self, tensor: int, pipeline: int, world: int, rank: int):
        import torch.distributed as dist

        from parallel.groups import rank_grid

        grid = rank_grid(tensor, pipeline, world // (tensor * pipeline))
        where = (grid == rank).nonzero()[0].tolist()
        p, d, t = where
        self.sets = {"tp": frozenset(grid[p, d, :].tolist()), "dp": frozenset(grid[p, :, t].tolist()),
                     "pp": frozenset(grid[:, d, t].tolist()),
                     "pp_embed": frozenset({grid[0, d, t].item(), grid[-1, d, t].item()})}
        self.dist = dist
        self.seconds: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def classify(self, group) -> str:
        ranks = frozenset(self.dist.get_process_group_ranks(group if group is not None else self.dist.group.WORLD))
        if len(ranks) == 1:
            return "local"
        for name in ("tp", "dp", "pp", "pp_embed"):
            if ranks == self.sets[name]:
                return "pp" if name == "pp_embed" else name
        return "other"

    def add(self, category: str, seconds: float, nbytes: int = 0) -> None:
        self.seconds[category] += seconds
        self.bytes[category] += nbytes
        self.calls[category] += 1

    def snapshot(self) -> dict:
        return {"seconds": dict(self.seconds), "bytes": dict(self.bytes), "calls": dict(self.calls)}

    @staticmethod
    def since(before: dict, after: dict) -> dict:
        return {kind: {k: after[kind].get(k, 0) - before[kind].get(k, 0) for k in after[kind]} for kind in after}


def _nbytes(obj) -> int:
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return obj.numel() * obj.element_size() if hasattr(obj, "numel") else 0


def install(probe: StepProbe) -> None:
    """Wrap the collectives, the pipeline receives and the DeepSpeed engine's forward/backward/step."""
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine

    from modeling.pipeline import PipelineChunk
    from parallel.p2p import PipeComm

    for name in COLLECTIVES:
        original = getattr(dist, name)

        def timed(*args, _original=original, **kwargs):
            started = time.perf_counter()
            out = _original(*args, **kwargs)
            probe.add("comm_" + probe.classify(kwargs.get("group")), time.perf_counter() - started,
                      _nbytes(args[0]) if args else 0)
            return out

        setattr(dist, name, timed)

    def wrap(cls, method: str, category: str):
        original = getattr(cls, method)

        def timed(self, *args, **kwargs):
            started = time.perf_counter()
            out = original(self, *args, **kwargs)
            probe.add(category, time.perf_counter() - started)
            return out

        setattr(cls, method, timed)

    wrap(PipeComm, "_recv", "comm_pp")
    wrap(PipeComm, "flush", "comm_pp")
    wrap(DeepSpeedEngine, "forward", "forward")
    wrap(PipelineChunk, "forward", "forward")
    wrap(DeepSpeedEngine, "backward", "backward")
    wrap(DeepSpeedEngine, "step", "optimizer")
