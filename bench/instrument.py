"""Measurements taken inside a training process: communication time and bytes per parallel group, and the
forward / backward / optimizer split of each step. Expert parallelism's token exchanges (``all_to_all_single``)
are their own category, ``ep``.

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
               "broadcast", "all_to_all_single")


# the ``bench comm`` fit each wrapped function is predicted with, and the factor from the bytes of the
# tensor the probe sees (args[0]) to the message size the fit was measured in
FIT_OF = {"all_reduce": ("all_reduce", 1), "all_gather": ("all_gather", 1), "all_gather_into_tensor": ("all_gather", 1),
          "reduce_scatter": ("reduce_scatter", "world"), "reduce_scatter_tensor": ("reduce_scatter", "world"),
          "broadcast": ("broadcast", 1)}


class StepProbe:
    """Accumulates, per category (tp / dp / pp / other, forward / backward / optimizer): seconds, bytes, calls,
    the seconds predicted by a ``bench comm`` latency + bandwidth fit, and (when ``barrier`` is on) the
    seconds spent waiting for the group's slowest rank before a collective. ``snapshot`` / ``since`` give
    per-step deltas."""

    KINDS = ("seconds", "bytes", "calls", "predicted", "wait")

    def __init__(self, tensor: int, pipeline: int, world: int, rank: int, fits: dict | None = None,
                 expert: int = 1):
        import torch.distributed as dist

        from parallel.groups import rank_grid

        grid = rank_grid(tensor, pipeline, world // (tensor * pipeline))
        where = (grid == rank).nonzero()[0].tolist()
        p, d, t = where
        self.sets = {"tp": frozenset(grid[p, d, :].tolist()), "dp": frozenset(grid[p, :, t].tolist()),
                     "pp": frozenset(grid[:, d, t].tolist()),
                     "pp_embed": frozenset({grid[0, d, t].item(), grid[-1, d, t].item()}),
                     # the ranks holding the same experts, which reduce their gradients: data-parallel traffic
                     "edp": frozenset(grid[p, d % expert::expert, t].tolist())}
        self.dist = dist
        self.fits = fits or {}
        self.barrier = False  # separate waiting for the slowest rank from the transfer (Megatron's barrier timers)
        self.totals: dict[str, dict[str, float]] = {kind: defaultdict(float) for kind in self.KINDS}

    def ranks_of(self, group) -> frozenset:
        return frozenset(self.dist.get_process_group_ranks(group if group is not None else self.dist.group.WORLD))

    def classify(self, ranks: frozenset) -> str:
        if len(ranks) == 1:
            return "local"
        for name in ("tp", "dp", "pp", "pp_embed", "edp"):
            if ranks == self.sets[name]:
                return {"pp_embed": "pp", "edp": "dp"}.get(name, name)
        return "other"

    def predict(self, function: str, nbytes: int, group_size: int) -> float:
        op, factor = FIT_OF.get(function, (function, 1))
        if op not in self.fits:
            return 0.0
        from bench.comm import predict_seconds

        return predict_seconds(self.fits[op], nbytes * (group_size if factor == "world" else factor))

    def add(self, category: str, seconds: float, nbytes: int = 0, predicted: float = 0.0, wait: float = 0.0) -> None:
        for kind, value in zip(self.KINDS, (seconds, nbytes, 1, predicted, wait)):
            self.totals[kind][category] += value

    def snapshot(self) -> dict:
        return {kind: dict(values) for kind, values in self.totals.items()}

    @staticmethod
    def since(before: dict, after: dict) -> dict:
        return {kind: {k: after[kind].get(k, 0) - before[kind].get(k, 0) for k in after[kind]} for kind in after}


# DeepSpeed's torch backend passes the tensors by keyword; the first of these present is the message
TENSOR_KWARGS = ("tensor", "output_tensor", "output", "tensor_list", "output_tensor_list")


def _nbytes(obj) -> int:
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return obj.numel() * obj.element_size() if hasattr(obj, "numel") else 0


def install(probe: StepProbe) -> None:
    """Wrap the collectives, the pipeline receives and the DeepSpeed engine's forward/backward (the optimizer
    step's seconds come from the run's ``optimizer`` phase: ``bench.sweep_worker.StepObserver``)."""
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine

    from modeling.pipeline import PipelineChunk
    from parallel.p2p import PipeComm

    for name in COLLECTIVES:
        original = getattr(dist, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            group = kwargs.get("group")
            ranks = probe.ranks_of(group)
            # only expert parallelism exchanges by all-to-all (its group may be the data-parallel ranks)
            category = "comm_" + ("ep" if _name == "all_to_all_single" else probe.classify(ranks))
            nbytes = _nbytes(args[0] if args else next((kwargs[k] for k in TENSOR_KWARGS if k in kwargs), None))
            wait = 0.0
            if probe.barrier and len(ranks) > 1 and not kwargs.get("async_op"):
                started = time.perf_counter()
                dist.barrier(group=group)
                wait = time.perf_counter() - started
            started = time.perf_counter()
            out = _original(*args, **kwargs)
            probe.add(category, time.perf_counter() - started, nbytes, probe.predict(_name, nbytes, len(ranks)), wait)
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

    original_receive = PipeComm.receive

    def timed_receive(self, *args, **kwargs):
        started = time.perf_counter()
        out = original_receive(self, *args, **kwargs)
        nbytes = out.numel() * out.element_size()
        probe.add("comm_pp", time.perf_counter() - started, nbytes, probe.predict("send_recv", nbytes, 2))
        return out

    PipeComm.receive = timed_receive
    wrap(PipeComm, "flush", "comm_pp")
    wrap(DeepSpeedEngine, "forward", "forward")
    wrap(PipelineChunk, "forward", "forward")
    wrap(DeepSpeedEngine, "backward", "backward")
