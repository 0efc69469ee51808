"""A flight recorder for hangs: every collective and point-to-point call this process makes through
``torch.distributed`` (ours and DeepSpeed's) is counted per process group and kept in a small ring buffer
(group, sequence number, operation, shape). When a collective times out, every rank that is still alive
publishes its record to the job's rendezvous store and reads the others', and all print the same verdict:
which rank is behind, on which group, at which operation it never entered.

No tensor is read and nothing is synchronised: a call costs one counter and one tuple, on the host.
"""

from __future__ import annotations

import collections
import functools
import inspect
import json
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

OPERATIONS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
              "broadcast", "reduce", "barrier", "all_to_all_single", "all_gather_object", "broadcast_object_list",
              "send", "recv", "batch_isend_irecv")
# isend / irecv stay unwrapped: P2POp accepts only torch's own functions (each P2POp of a batch is recorded)
POINT_TO_POINT = {"send", "recv", "isend", "irecv"}


@dataclass(frozen=True)
class Call:
    group: str              # "name:ranks" of the process group (groups with the same ranks differ by name)
    seq: int                # this call's number on that group, from 1
    operation: str
    shape: tuple[int, ...]


class FlightRecorder:
    """Wraps the ``torch.distributed`` functions in ``OPERATIONS`` for the life of the process (``install``)."""

    def __init__(self, capacity: int = 64):
        self.calls: collections.deque[Call] = collections.deque(maxlen=capacity)
        self.counts: dict[str, int] = collections.Counter()
        self._names: dict[int, str] = {}
        self._sizes: dict[int, int] = {}
        self.sent: dict[str, int] = collections.Counter()  # bytes this rank sent, per group (``bytes_sent``)
        self.reporters: list[int] = []   # the ranks whose report ``exchange`` received

    def install(self) -> "FlightRecorder":
        for name in OPERATIONS:
            original = getattr(dist, name, None)
            if original is not None and not hasattr(original, "flight_recorded"):
                setattr(dist, name, self._wrap(name, original))
        return self

    def _wrap(self, name: str, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def recorded(*args, **kwargs):
            self.record(name, signature.bind_partial(*args, **kwargs).arguments)
            return original(*args, **kwargs)

        marked: Any = recorded
        marked.flight_recorded, marked.recorder = True, self
        return marked

    def record(self, name: str, arguments: dict) -> None:
        if name == "batch_isend_irecv":
            for op in arguments["p2p_op_list"]:
                self.record(op.op.__name__, {"group": op.group, "dst": op.peer, "tensor": op.tensor})
            return
        group = self._group_name(arguments.get("group"))
        if name in POINT_TO_POINT:
            peer = arguments.get("dst", arguments.get("src"))
            group = f"{group}:pair{sorted({dist.get_rank(), peer})}" if peer is not None else group
        self.counts[group] += 1
        tensor = arguments.get("tensor", arguments.get("output_tensor", arguments.get("output")))
        shape = tuple(getattr(tensor, "shape", ()))
        self.calls.append(Call(group, self.counts[group], name, shape))
        counted = arguments.get("input") if name in _COUNTED_BY_INPUT else tensor
        if counted is not None and hasattr(counted, "element_size"):
            self.sent[group] += bytes_sent(name, counted.numel() * counted.element_size(),
                                           self._sizes[id(arguments.get("group"))])

    def _group_name(self, group) -> str:
        key = id(group)
        if key not in self._names:
            pg: Any = group if group is not None else dist.group.WORLD
            self._names[key] = f"group {pg.group_name} of ranks {dist.get_process_group_ranks(pg)}"
            self._sizes[key] = dist.get_world_size(pg)
        return self._names[key]

    def report(self) -> dict:
        """What this rank publishes: its count per group and its last calls (the last one it is waiting in)."""
        return {"counts": [[g, n] for g, n in self.counts.items()],
                "calls": [[c.group, c.seq, c.operation, list(c.shape)] for c in self.calls]}


# Bytes one rank sends in an operation, as a multiple of the bytes of the tensor counted (the tensor of an
# all-reduce, broadcast or send, the output of an all-gather, the input of a reduce-scatter or all-to-all, whose
# splits may be uneven) among ``n`` ranks, as bandwidth-optimal (ring) algorithms send: what the α-β model of a
# link charges, the same for gloo and NCCL.
_COUNTED_BY_INPUT = ("all_to_all_single", "reduce_scatter_tensor")
_SENT_FRACTION = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter_tensor": lambda n: (n - 1) / n,
                  "all_gather_into_tensor": lambda n: (n - 1) / n, "all_to_all_single": lambda n: (n - 1) / n,
                  "broadcast": lambda n: 1.0 if n > 1 else 0.0, "reduce": lambda n: 1.0 if n > 1 else 0.0,
                  "send": lambda n: 1.0, "isend": lambda n: 1.0}


def bytes_sent(operation: str, tensor_bytes: int, n: int) -> int:
    """What one rank sends for ``operation`` on a ``tensor_bytes`` tensor among ``n`` ranks (0 for receives and
    for operations on lists of tensors, which colonnade's hot paths do not use)."""
    fraction = _SENT_FRACTION.get(operation)
    return round(fraction(n) * tensor_bytes) if fraction is not None else 0


def sent_over(recorder: FlightRecorder | None, ranks: list[int]) -> int:
    """Bytes this rank has sent so far on the groups made of exactly ``ranks`` (0 without a recorder)."""
    if recorder is None:
        return 0
    return sum(n for group, n in recorder.sent.items() if ":pair" not in group and _members(group) == sorted(ranks))


def exchange(recorder: FlightRecorder, wait_s: float) -> dict[int, dict]:
    """Publish this rank's report on the rendezvous store and collect every rank's that arrives within
    ``wait_s`` (a rank stalled outside any collective, or gone, sends none)."""
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    store.set(f"colonnade/flight/{rank}", json.dumps(recorder.report()))
    reports: dict[int, dict] = {}
    deadline = time.monotonic() + wait_s
    while len(reports) < world:
        for other in range(world):
            key = f"colonnade/flight/{other}"
            if other not in reports and store.check([key]):
                reports[other] = json.loads(store.get(key))
        if len(reports) < world and time.monotonic() > deadline:
            break
        time.sleep(0.05)
    recorder.reporters = sorted(reports)
    return reports


def await_printed(recorder: FlightRecorder, wait_s: float) -> None:
    """Called once this rank has printed the verdict: say so on the store and wait (at most ``wait_s``) until
    every rank that took part in the exchange has printed its own, so that the launcher, seeing the first rank
    exit, does not kill another mid-report."""
    store = dist.distributed_c10d._get_default_store()
    store.set(f"colonnade/flight/printed/{dist.get_rank()}", "1")
    waiting = [f"colonnade/flight/printed/{r}" for r in recorder.reporters]
    deadline = time.monotonic() + wait_s
    while not store.check(waiting) and time.monotonic() < deadline:
        time.sleep(0.05)


def verdict(reports: dict[int, dict], world: int) -> str:
    """Who is behind: for each group, the ranks whose count is below the highest, with the call the others
    are waiting in; ranks that sent no report are named too."""
    lines = []
    silent = [r for r in range(world) if r not in reports]
    counts: dict[str, dict[int, int]] = collections.defaultdict(dict)
    calls = {}
    for rank, report in reports.items():
        for group, n in report["counts"]:
            counts[group][rank] = n
        for group, seq, operation, shape in report["calls"]:
            calls[(group, seq)] = (operation, tuple(shape))
    for group, by_rank in sorted(counts.items()):
        members = _members(group)
        ahead = max(by_rank.values())
        behind = sorted(r for r in members if (r in reports and by_rank.get(r, 0) < ahead) or r in silent)
        if behind:
            operation, shape = calls.get((group, ahead), ("?", ()))
            waiting = sorted(r for r, n in by_rank.items() if n == ahead)
            lines.append(f"rank(s) {behind} never entered {operation} #{ahead} (shape {list(shape)}) on {group}, "
                         f"in which rank(s) {waiting} wait; "
                         + "; ".join(f"rank {r} is in {_last(reports[r])}" if r in reports else
                                     f"rank {r} sent no report (stalled outside any collective, or gone)"
                                     for r in behind))
    return "; ".join(lines) if lines else "every rank entered the same calls (a slow collective, not a missing one)"


def _members(group: str) -> list[int]:
    """The ranks of "group N of ranks [..]" (the pair, for "...:pair[a, b]")."""
    return json.loads(group.rpartition("pair")[2] if ":pair" in group else group.rpartition("ranks ")[2])


def _last(report: dict) -> str:
    if not report["calls"]:
        return "no collective yet"
    group, seq, operation, shape = report["calls"][-1]
    return f"{operation} #{seq} (shape {shape}) on {group}"


def installed() -> FlightRecorder | None:
    """The recorder ``install`` put in place in this process, if any."""
    return getattr(dist.all_reduce, "recorder", None)
