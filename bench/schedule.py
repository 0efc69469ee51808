"""Tick-level pipeline schedule simulator: each rank's timeline and the bubble share vs theory."""

from __future__ import annotations

import argparse

from parallel.schedules import ORDERS, render, simulate

PROG = "python -m bench schedule"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _check(args) -> float:
    """Bad input as one line (exit code 2) before anything is simulated; returns the W op's time."""
    from bench.cli import fail

    if not args.backward_time > 0:
        fail(PROG, f"--backward-time {args.backward_time:g}: the backward's time relative to the forward's (1) "
                   f"must be positive, e.g. 2")
    weight = args.backward_time / 2 if args.weight_time is None else args.weight_time
    if not 0 <= weight <= args.backward_time:
        fail(PROG, f"--weight-time {weight:g}: the weight-gradient part of the backward must be between 0 and "
                   f"--backward-time {args.backward_time:g} (the input-gradient part is the rest)")
    if args.virtual_stages > 1 and args.schedule != "interleaved":
        fail(PROG, f"-v {args.virtual_stages}: virtual stages need --schedule interleaved ({args.schedule} runs "
                   f"one chunk per rank); drop -v or choose interleaved")
    if args.schedule == "interleaved" and args.virtual_stages < 2:
        fail(PROG, "--schedule interleaved needs -v 2 or more (model chunks per rank)")
    return weight


def zb_h1_theory(p: int, m: int, backward: float, weight: float) -> tuple[float | None, str]:
    """Qi et al.'s ZB-H1 bubble with F = 1, B = the input-gradient part (``backward - weight``), W = ``weight``:
    (p-1)(F+B-W) / ((p-1)(F+B-W) + m(F+B+W)), which holds for W <= F, W <= B and m >= p (there the simulator
    agrees with it exactly). Returns (the value or None outside that domain, why)."""
    b = backward - weight
    outside = [why for why, bad in ((f"W={weight:g} > F=1", weight > 1), (f"W={weight:g} > B={b:g}", weight > b),
                                    (f"m={m} < p={p}", m < p)) if bad]
    if outside:
        return None, ", ".join(outside)
    idle = (p - 1) * (1 + b - weight)
    return idle / (idle + m * (1 + backward)), ""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--schedule", default="1f1b", choices=sorted(ORDERS))
    parser.add_argument("-p", "--stages", type=_positive, default=4)
    parser.add_argument("-m", "--microbatches", type=_positive, default=8)
    parser.add_argument("-v", "--virtual-stages", type=_positive, default=1)
    parser.add_argument("--backward-time", type=float, default=2.0, help="backward time / forward time")
    parser.add_argument("--weight-time", type=float, default=None,
                        help="the weight-gradient part of the backward (zb-h1's W op), at most --backward-time; "
                        "default half of it")
    args = parser.parse_args(argv)
    weight = _check(args)
    try:
        sim = simulate(args.schedule, args.stages, args.microbatches, args.virtual_stages,
                       backward_time=args.backward_time, weight_time=weight)
    except ValueError as exc:  # an impossible (schedule, p, m, v): one line and exit code 2, as argparse does
        from bench.cli import fail

        fail(PROG, str(exc))
    print(render(sim, columns_per_unit=2 * args.virtual_stages))
    p, m, v = args.stages, args.microbatches, args.virtual_stages
    if args.schedule == "zb-h1":
        value, outside = zb_h1_theory(p, m, args.backward_time, weight)
        formula = "theory (p-1)(F+B-W) / ((p-1)(F+B-W) + m(F+B+W)) (Qi et al. 2023; B: the input-gradient part)"
        print(f"{formula} = {value:.3f}" if value is not None else
              f"{formula}: does not apply here ({outside}; it holds for W <= F, W <= B, m >= p)")
    else:
        print(f"theory (p-1)/(v*m+p-1) = {(p - 1) / (v * m + p - 1):.3f}")
    return sim


if __name__ == "__main__":
    main()
