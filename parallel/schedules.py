"""Pipeline schedules: GPipe, 1F1B, interleaved 1F1B and zero-bubble ZB-H1.

A schedule is a per-rank list of operations (forward, backward or weight-gradient pass of one micro-batch on
one local model chunk), produced by a pure function; ``run_schedule`` executes such a list with
``forward_step``, ``backward_step`` and (split schedules) ``weight_step`` callbacks and a ``PipeComm``.
Schedules know nothing of data or loss: the callbacks do. ``simulate`` plays the same lists on a clock to
show each rank's timeline and the bubble.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from parallel.p2p import PipeComm


@dataclass(frozen=True)
class Op:
    kind: str  # "F", "B" or "W" (a split backward's weight gradients; B is then the input gradient only)
    chunk: int  # local model chunk (virtual stage) on this rank
    microbatch: int


def gpipe_order(p: int, m: int, rank: int, v: int = 1) -> list[Op]:
    """All forwards, then all backwards: every micro-batch's activations are alive at once."""
    return [Op("F", 0, k) for k in range(m)] + [Op("B", 0, k) for k in range(m)]


def one_f_one_b_order(p: int, m: int, rank: int, v: int = 1) -> list[Op]:
    """Warm-up forwards, then one forward / one backward in turn, then the remaining backwards."""
    warmup = min(p - rank - 1, m)
    ops = [Op("F", 0, k) for k in range(warmup)]
    for k in range(m - warmup):
        ops += [Op("F", 0, warmup + k), Op("B", 0, k)]
    return ops + [Op("B", 0, k) for k in range(m - warmup, m)]


def interleaved_order(p: int, m: int, rank: int, v: int = 2) -> list[Op]:
    """Megatron's interleaved 1F1B: ``v`` model chunks per rank, micro-batches in groups of ``p``."""
    if m % p:
        raise ValueError(f"interleaved schedule needs micro-batches ({m}) divisible by pipeline stages ({p})")
    total = m * v

    def op(kind: str, k: int) -> Op:
        chunk = (k % (p * v)) // p
        return Op(kind, v - 1 - chunk if kind == "B" else chunk, (k // (p * v)) * p + k % p)

    warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    ops = [op("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        ops += [op("F", warmup + k), op("B", k)]
    return ops + [op("B", k) for k in range(total - warmup, total)]


def zb_h1_order(p: int, m: int, rank: int, v: int = 1) -> list[Op]:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2023): 1F1B's forwards and backwards in 1F1B's
    order, the backward split into B (input gradient, which the previous stage waits for) and W (weight
    gradients, which nothing waits for). Rank r holds back the W of its first r micro-batches and runs them
    after its last B, where 1F1B leaves it idle while the ranks before it drain; every other B is followed by
    the oldest pending W. Same messages as 1F1B, same activations in flight."""
    ops, pending, backwards = [], [], 0
    for op in one_f_one_b_order(p, m, rank):
        ops.append(op)
        if op.kind == "B":
            pending.append(op.microbatch)
            backwards += 1
            if backwards > rank:
                ops.append(Op("W", 0, pending.pop(0)))
    return ops + [Op("W", 0, k) for k in pending]


ORDERS = {"gpipe": gpipe_order, "1f1b": one_f_one_b_order, "interleaved": interleaved_order, "zb-h1": zb_h1_order}
SPLIT_BACKWARD = {"zb-h1"}  # schedules whose backward is a B and a W op


def check_schedule(schedule: str, p: int, m: int, v: int) -> None:
    """Raise ValueError for a combination the schedule cannot run."""
    if schedule not in ORDERS:
        raise ValueError(f"parallel.schedule={schedule!r}: choose one of {sorted(ORDERS)}")
    if schedule == "interleaved":
        if v < 2:
            raise ValueError("parallel.schedule=interleaved needs parallel.virtual_stages >= 2")
        if m % p:
            raise ValueError(f"parallel.schedule=interleaved needs train.grad_accum (micro-batches, {m}) to be "
                             f"a multiple of parallel.pipeline ({p})")
    elif v != 1:
        raise ValueError(f"parallel.virtual_stages={v} needs parallel.schedule=interleaved (zb-h1 runs one "
                         f"chunk per rank)")


@dataclass
class ScheduleStats:
    max_in_flight: int = 0  # micro-batch activations held at once on this rank (all chunks)


def _receives_from(op: Op, p: int, rank: int, last: int) -> int:
    """Stage offset this op's input comes from: -1 (previous) for a forward, +1 (next) for a backward; 0 if
    none (the model's first chunk's forward, the loss's backward, a W op)."""
    g = op.chunk * p + rank
    if op.kind == "F":
        return -1 if g > 0 else 0
    return 1 if op.kind == "B" and g < last else 0


def _sends_to(op: Op, p: int, rank: int, last: int) -> int:
    g = op.chunk * p + rank
    if op.kind == "F":
        return 1 if g < last else 0
    return -1 if op.kind == "B" and g > 0 else 0


def message_order(ops_of_rank: list[list[Op]], p: int, v: int) -> dict[tuple[int, int], tuple[list, list]]:
    """For each (sender, receiver) pair: the messages the sender posts, in its order, and those the receiver
    posts receives for, in its order, as (kind, boundary chunk, micro-batch). Untagged p2p is correct only
    where the two lists are equal for every pair."""
    last = p * v - 1
    pairs: dict[tuple[int, int], tuple[list, list]] = {}
    for rank, ops in enumerate(ops_of_rank):
        for op in ops:
            g = op.chunk * p + rank
            message = ("activation", g, op.microbatch) if op.kind == "F" else ("gradient", g - 1, op.microbatch)
            if _sends_to(op, p, rank, last):
                pairs.setdefault((rank, (rank + _sends_to(op, p, rank, last)) % p), ([], []))[0].append(message)
            source = _receives_from(op, p, rank, last)
            if source:
                wanted = ("activation", g - 1, op.microbatch) if op.kind == "F" else ("gradient", g, op.microbatch)
                pairs.setdefault(((rank + source) % p, rank), ([], []))[1].append(wanted)
    return pairs


def run_schedule(ops: list[Op], *, p: int, v: int, rank: int, comm: PipeComm,
                 forward_step: Callable[[int, int, torch.Tensor | None], torch.Tensor],
                 backward_step: Callable[[torch.Tensor, torch.Tensor | None, int, int], None] | None,
                 weight_step: Callable[[int, int], None] | None = None,
                 forward_only: bool = False) -> ScheduleStats:
    """Execute ``ops`` on this pipeline rank.

    ``forward_step(chunk, microbatch, input)`` returns the chunk's output; on the model's last chunk that
    is the (scaled) loss. ``input`` is None on the model's first chunk. ``backward_step(output, grad, chunk,
    microbatch)`` back-propagates (``grad`` is None for the loss); ``weight_step(chunk, microbatch)`` runs a
    W op of a split schedule. After each F or B op, one ``comm.exchange`` sends its result and posts the
    receive of the next F or B op's input (W ops communicate nothing: the receive stays in flight across
    them). Inputs and outputs are released as soon as their backward is done (at once with
    ``forward_only``, for eval)."""
    last = p * v - 1
    in_flight: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
    stats = ScheduleStats()
    talking = [op for op in ops if op.kind != "W"]  # the ops that exchange messages, in order
    if talking:
        comm.exchange(recv_from=_receives_from(talking[0], p, rank, last))
    position = 0
    for op in ops:
        if op.kind == "W":
            if weight_step is None:
                raise ValueError("a schedule with W ops needs a weight_step")
            weight_step(op.chunk, op.microbatch)
            continue
        received = comm.receive() if _receives_from(op, p, rank, last) else None
        if op.kind == "F":
            x = received if received is None or forward_only else received.requires_grad_()
            y = forward_step(op.chunk, op.microbatch, x)
            result: torch.Tensor | None = y
            if not forward_only:
                in_flight[(op.chunk, op.microbatch)] = (x, y)
                stats.max_in_flight = max(stats.max_in_flight, len(in_flight))
        else:
            x, y = in_flight.pop((op.chunk, op.microbatch))
            if backward_step is None:
                raise ValueError("a schedule with B ops needs a backward_step")
            backward_step(y, received, op.chunk, op.microbatch)
            result = x.grad if x is not None else None
            del x, y
        position += 1
        following = talking[position] if position < len(talking) else None
        destination = _sends_to(op, p, rank, last)
        comm.exchange(send=result if destination else None, send_to=destination,
                      recv_from=_receives_from(following, p, rank, last) if following else 0)
    comm.flush()
    assert not in_flight, f"schedule left activations of {sorted(in_flight)} without a backward"
    return stats


def simulate(schedule: str, p: int, m: int, v: int = 1, forward_time: float = 1.0, backward_time: float = 1.0,
             weight_time: float | None = None) -> dict:
    """Play each rank's op list on a clock: an op starts when its rank is free and its input exists (the
    previous chunk's forward, or the next chunk's backward; a W its own B). ``backward_time`` is the whole
    backward, ``weight_time`` the weight-gradient part of it (default half: a linear layer's two backward
    GEMMs cost the same), which split schedules run as a separate W op. Chunk times are the stage times
    divided by ``v``. Returns the per-rank timelines, the makespan and the bubble share (idle / total
    rank-time)."""
    orders = [ORDERS[schedule](p, m, r, v) for r in range(p)]
    weight_time = backward_time / 2 if weight_time is None else weight_time
    split = schedule in SPLIT_BACKWARD
    duration = {"F": forward_time / v, "B": (backward_time - (weight_time if split else 0.0)) / v,
                "W": weight_time / v}
    done: dict[tuple[str, int, int], float] = {}  # (kind, global chunk, microbatch) -> finish time
    clock = [0.0] * p
    position = [0] * p
    timelines: list[list[tuple[float, float, Op]]] = [[] for _ in range(p)]
    while any(position[r] < len(orders[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            if position[r] == len(orders[r]):
                continue
            op = orders[r][position[r]]
            needs = _inputs_of(op, op.chunk * p + r, p * v - 1)
            if any(n not in done for n in needs):
                continue
            start = max([clock[r]] + [done[n] for n in needs])
            end = start + duration[op.kind]
            done[(op.kind, op.chunk * p + r, op.microbatch)] = end
            clock[r] = end
            timelines[r].append((start, end, op))
            position[r] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {schedule} deadlocks for p={p}, m={m}, v={v}")
    makespan = max(clock)
    busy = sum(end - start for line in timelines for start, end, _ in line)
    return {"timelines": timelines, "makespan": makespan, "bubble": 1 - busy / (p * makespan)}


def _inputs_of(op: Op, g: int, last: int) -> list[tuple[str, int, int]]:
    """The ops (kind, global chunk, micro-batch) whose results ``op`` on global chunk ``g`` needs."""
    if op.kind == "F":
        return [("F", g - 1, op.microbatch)] if g > 0 else []
    if op.kind == "W":
        return [("B", g, op.microbatch)]
    return [("F", g, op.microbatch)] + ([("B", g + 1, op.microbatch)] if g < last else [])


def render(sim: dict, columns_per_unit: int = 2) -> str:
    """Text chart: one row per rank; F/B/W letters with the micro-batch number, '.' idle."""
    rows = []
    width = int(round(sim["makespan"] * columns_per_unit))
    for r, line in enumerate(sim["timelines"]):
        cells = ["."] * width
        for start, end, op in line:
            a, b = int(round(start * columns_per_unit)), int(round(end * columns_per_unit))
            label = f"{op.kind if op.chunk == 0 else op.kind.lower()}{op.microbatch}"
            for i in range(a, b):
                cells[i] = label[(i - a) % len(label)] if b - a >= len(label) else op.kind
        rows.append(f"rank {r}: " + "".join(cells))
    rows.append(f"bubble: {sim['bubble']:.3f}")
    return "\n".join(rows)
