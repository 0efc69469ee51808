"""Tick-level pipeline schedule simulator: each rank's timeline and the bubble share vs theory."""

from __future__ import annotations

import argparse

from parallel.schedules import ORDERS, render, simulate


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench schedule", description=__doc__)
    parser.add_argument("--schedule", default="1f1b", choices=sorted(ORDERS))
    parser.add_argument("-p", "--stages", type=_positive, default=4)
    parser.add_argument("-m", "--microbatches", type=_positive, default=8)
    parser.add_argument("-v", "--virtual-stages", type=_positive, default=1)
    parser.add_argument("--backward-time", type=float, default=2.0, help="backward time / forward time")
    parser.add_argument("--weight-time", type=float, default=None,
                        help="the weight-gradient part of the backward (zb-h1's W op); default half of it")
    args = parser.parse_args(argv)
    try:
        sim = simulate(args.schedule, args.stages, args.microbatches, args.virtual_stages,
                       backward_time=args.backward_time, weight_time=args.weight_time)
    except ValueError as exc:  # an impossible (schedule, p, m, v): one line and exit code 2, as argparse does
        parser.error(str(exc))
    print(render(sim, columns_per_unit=2 * args.virtual_stages))
    p, m, v = args.stages, args.microbatches, args.virtual_stages
    if args.schedule == "zb-h1":
        w = args.backward_time / 2 if args.weight_time is None else args.weight_time
        idle = (p - 1) * (1 + args.backward_time - 2 * w)
        print(f"theory (p-1)(F+B-W) / ((p-1)(F+B-W) + m(F+B+W)) = {idle / (idle + m * (1 + args.backward_time)):.3f}"
              f" (Qi et al. 2023; holds for W <= F, W <= B, m >= p)")
    else:
        print(f"theory (p-1)/(v*m+p-1) = {(p - 1) / (v * m + p - 1):.3f}")
    return sim


if __name__ == "__main__":
    main()
