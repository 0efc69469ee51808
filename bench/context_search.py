"""``bench context``'s pure parts: the search for the longest sequence that trains within a memory budget, and
the bars of issue 36 on what it measured. No torch, no launch: ``tests/test_bench_context.py`` drives them with
made-up measurements.

The search (``next_length``) probes sequence lengths on multiples of a quantum (2N x 64 at context N: every
length splits into the 2N load-balanced chunks). It grows from ``start`` until a probe fails, then narrows the
bracket between the longest length that fitted and the shortest that did not; each new length is the linear
interpolation (or extrapolation) of the measured peaks to the budget, a regula falsi step kept inside the
bracket (from a single fit: a line through the origin, at most a doubling), so that with memory linear in the
length two or three probes after the first find the answer. It ends when the bracket is one quantum wide: the
answer fitted and one quantum more did not, both measured."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Trial:
    seq_len: int
    peak: float  # the measured peak (bytes); inf when the run failed
    fits: bool   # trained and peak <= budget


def quantum(context: int) -> int:
    """The search's step at context ``context``: 2 chunks per rank of 64 tokens."""
    return 2 * context * 64


def _down(x: float, q: int) -> int:
    return int(x // q) * q


def _up(x: float, q: int) -> int:
    return int(math.ceil(x / q)) * q


def bracket(trials: list[Trial]) -> tuple[Trial | None, Trial | None]:
    """(the longest trial that fitted, the shortest that did not, longer than it), either None."""
    fitted = [t for t in trials if t.fits]
    lo = max(fitted, key=lambda t: t.seq_len) if fitted else None
    above = [t for t in trials if not t.fits and (lo is None or t.seq_len > lo.seq_len)]
    hi = min(above, key=lambda t: t.seq_len) if above else None
    return lo, hi


def _slope_guess(lo: Trial, other: Trial | None, budget: float) -> float:
    """Where the line through ``lo`` and ``other`` (or the origin) reaches the budget."""
    if other is None or not math.isfinite(other.peak) or other.peak == lo.peak:
        return lo.seq_len * budget / lo.peak if lo.peak > 0 else 2 * lo.seq_len
    slope = (other.peak - lo.peak) / (other.seq_len - lo.seq_len)
    return lo.seq_len + (budget - lo.peak) / slope if slope > 0 else 2 * lo.seq_len


def next_length(trials: list[Trial], budget: float, q: int, start: int, limit: int) -> int | None:
    """The next length to probe, or None when the search is done (``longest``). ``limit``: the longest
    length allowed (the model's positions); ``start``: the first probe."""
    if not trials:
        return min(max(q, _down(start, q)), _down(limit, q))
    lo, hi = bracket(trials)
    if lo is None:  # nothing fitted yet: halve the shortest failure
        shortest = min(t.seq_len for t in trials)
        half = _down(shortest / 2, q)
        return half if half >= q else None
    if hi is None:  # grow: extrapolate through the two longest fits (at most double; never past the limit)
        if lo.seq_len + q > limit:
            return None
        fitted = sorted((t for t in trials if t.fits), key=lambda t: t.seq_len)
        other = fitted[-2] if len(fitted) > 1 else None
        guess = _up(_slope_guess(lo, other, budget), q)
        most = 2 * lo.seq_len if other is None else limit  # through the origin at first: at most a doubling
        return min(max(guess, lo.seq_len + q), most, _down(limit, q))
    if hi.seq_len - lo.seq_len <= q:
        return None
    guess = _down(_slope_guess(lo, hi, budget), q) if math.isfinite(hi.peak) else \
        _down((lo.seq_len + hi.seq_len) / 2, q)
    return min(max(guess, lo.seq_len + q), hi.seq_len - q)


def longest(probe: Callable[[int], tuple[float, bool]], budget: float, q: int, start: int, limit: int,
            max_probes: int = 10) -> tuple[int, list[Trial]]:
    """(the longest multiple of ``q`` up to ``limit`` whose run fits ``budget``, 0 if none; every trial).
    ``probe(seq_len)`` -> (its peak, whether it trained); it fits when it trained and peak <= budget."""
    trials: list[Trial] = []
    while len(trials) < max_probes:
        seq = next_length(trials, budget, q, start, limit)
        if seq is None:
            break
        peak, trained = probe(seq)
        trials.append(Trial(seq, peak if trained else math.inf, trained and peak <= budget))
    lo, _ = bracket(trials)
    return (lo.seq_len if lo else 0), trials


def bars(longest_by_n: dict[int, int], activations: dict[int, float]) -> list[dict]:
    """Issue 36's bars: the longest sequence at N=2 and N=4 over N=1's (>= 1.8x, >= 3.4x), and the activation
    bytes per rank at N=2 over N=1's at the fixed length (<= 0.55x); a bar whose numbers are missing is left
    out."""
    out = []
    base = longest_by_n.get(1)
    for n, floor in ((2, 1.8), (4, 3.4)):
        if base and n in longest_by_n:
            value = longest_by_n[n] / base
            out.append({"bar": f"longest sequence N={n} / N=1", "value": value, "goal": f">= {floor}",
                        "pass": value >= floor})
    if activations.get(1) and 2 in activations:
        value = activations[2] / activations[1]
        out.append({"bar": "activation bytes per rank N=2 / N=1", "value": value, "goal": "<= 0.55",
                    "pass": value <= 0.55})
    return out
