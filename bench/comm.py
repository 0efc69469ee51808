"""Collective microbenchmarks: latency, algorithm and bus bandwidth per message size (nccl-tests formulas),
measured both through colonnade's communication layer and on raw ``torch.distributed`` so the harness's own
overhead is visible, plus a latency + bandwidth fit (time = alpha + bytes / bandwidth) per collective that
other benchmarks use to predict communication time.

    python -m bench comm --nproc 2 --max-size 64M --out bench/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.launch import add_worker_arguments, ran_as_worker

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send_recv")


def bus_factor(op: str, n: int) -> float:
    """busbw = algbw x factor (nccl-tests PERFORMANCE.md): all-reduce 2(n-1)/n; all-gather and
    reduce-scatter (n-1)/n; broadcast and point-to-point 1."""
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter"):
        return (n - 1) / n
    return 1.0


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def sizes_between(lo: int, hi: int) -> list[int]:
    sizes, size = [], lo
    while size <= hi:
        sizes.append(size)
        size *= 4
    return sizes


def fit_latency_bandwidth(points: list[tuple[int, float]]) -> dict:
    """Fit time = alpha + beta * bytes minimizing the relative error sum(((alpha + beta*b - t) / t)^2), so the
    microsecond-scale small messages weigh as much as the large ones; returns alpha (s), bandwidth (bytes/s)."""
    w = [1 / t**2 for _, t in points]
    s_w = sum(w)
    s_x = sum(wi * b for wi, (b, _) in zip(w, points))
    s_y = sum(wi * t for wi, (_, t) in zip(w, points))
    s_xx = sum(wi * b * b for wi, (b, _) in zip(w, points))
    s_xy = sum(wi * b * t for wi, (b, t) in zip(w, points))
    det = s_w * s_xx - s_x**2
    beta = (s_w * s_xy - s_x * s_y) / det if det else 0.0
    alpha = (s_y - beta * s_x) / s_w
    if alpha < 0:  # no measurable latency: bandwidth-only fit through the origin
        alpha, beta = 0.0, s_xy / s_xx
    return {"alpha_s": alpha, "bandwidth_Bps": (1 / beta) if beta > 0 else float("inf")}


def predict_seconds(fit: dict, nbytes: int) -> float:
    return fit["alpha_s"] + nbytes / fit["bandwidth_Bps"]


def _time(fn, iters: int, warmup: int, sync) -> float:
    """Mean seconds of one call entered by all ranks together: a barrier before each call, then the call
    alone is timed (the way the sweep's probe times collectives inside training, so a prediction from this
    fit and a measurement there are the same quantity)."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    sync()
    total = 0.0
    for _ in range(iters):
        dist.barrier()
        started = time.perf_counter()
        fn()
        sync()
        total += time.perf_counter() - started
    return total / iters


def _operations(op: str, nbytes: int, rank: int, world: int, device, dtype):
    """(raw torch.distributed callable, colonnade-layer callable or None) moving ``nbytes`` per rank in the
    nccl-tests sense (all-gather: the gathered output; reduce-scatter: the input).

    Where an operation produces a new tensor (all-gather, reduce-scatter, receive), both sides allocate it
    per call, as training code that keeps the result must; the difference is then our layer alone. (nccl-tests
    reuse one preallocated buffer; on CPU that hides the first-touch cost of fresh pages, up to a third of the
    time of a 4-16 MiB all-gather here, which GPU caching allocators avoid.)"""
    import torch
    import torch.distributed as dist

    from parallel import comm
    from parallel.p2p import PipeComm

    elements = max(world, nbytes // torch.tensor([], dtype=dtype).element_size() // world * world)
    x = torch.ones(elements, dtype=dtype, device=device)
    shard = torch.ones(elements // world, dtype=dtype, device=device)
    group = dist.group.WORLD
    if op == "all_reduce":
        return (lambda: dist.all_reduce(x)), (lambda: comm.all_reduce(x, group))
    if op == "all_gather":
        return ((lambda: dist.all_gather_into_tensor(torch.empty_like(x), shard)),
                (lambda: comm.all_gather_along(shard, 0, group)))
    if op == "reduce_scatter":
        return ((lambda: dist.reduce_scatter_tensor(torch.empty_like(shard), x)),
                (lambda: comm._reduce_scatter(x, 0, group)))
    if op == "broadcast":
        return (lambda: dist.broadcast(x, src=0)), None
    # send/recv between ranks 0 and 1 (others idle): raw blocking pair vs PipeComm (batched, timed out)
    peer = 1 - rank if rank < 2 else None
    pipe = PipeComm([0, 1], rank, tuple(x.shape), dtype, device) if rank < 2 else None

    def raw():
        if rank == 0:
            dist.send(x, dst=1)
        elif rank == 1:
            dist.recv(torch.empty_like(x), src=0)

    def ours():
        if rank == 0:
            pipe.exchange(send=x, send_to=1)
            pipe.flush()
        elif rank == 1:
            pipe.exchange(recv_from=-1)
            pipe.receive()

    return (raw if peer is not None else (lambda: None)), (ours if peer is not None else (lambda: None))


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from training.lifecycle import init_distributed

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    rows = []
    for op in args.ops.split(","):
        for nbytes in sizes_between(parse_size(args.min_size), parse_size(args.max_size)):
            iters = max(2, min(args.iters, int(args.iters * 2**20 / max(nbytes, 1))))
            raw, ours = _operations(op, nbytes, rank, world, device, torch.float32)
            # alternate raw and ours (ABBA) and keep each side's median: this shared VM drifts by more than
            # the difference being measured
            samples = {"raw": [], "ours": []}
            for round_ in range(args.rounds):
                for side in (("raw", "ours") if round_ % 2 == 0 else ("ours", "raw")):
                    fn = raw if side == "raw" else ours
                    if fn is not None:
                        dist.barrier()
                        samples[side].append(_time(fn, iters, 1, sync))
            raw_s = statistics.median(samples["raw"])
            ours_s = statistics.median(samples["ours"]) if ours is not None else None
            # every rank's time is the collective's time; take the slowest rank
            times = torch.tensor([raw_s, ours_s if ours_s is not None else 0.0], dtype=torch.float64)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
            raw_s, ours_s = float(times[0]), (float(times[1]) if ours is not None else None)
            n = 2 if op == "send_recv" else world
            rows.append({"op": op, "bytes": nbytes, "ranks": n, "iters": iters, "raw_s": raw_s,
                         "raw_algbw_GBps": nbytes / raw_s / 1e9,
                         "raw_busbw_GBps": nbytes / raw_s / 1e9 * bus_factor(op, n),
                         "colonnade_s": ours_s,
                         "colonnade_busbw_GBps": (nbytes / ours_s / 1e9 * bus_factor(op, n)) if ours_s else None})
    if rank == 0:
        Path(args.out_file).write_text(json.dumps(rows))


def report(rows: list[dict]) -> tuple[str, dict]:
    fits = {op: fit_latency_bandwidth([(r["bytes"], r["raw_s"]) for r in rows if r["op"] == op])
            for op in dict.fromkeys(r["op"] for r in rows)}
    lines = ["| op | bytes | latency (us) | algbw (GB/s) | busbw (GB/s) | colonnade busbw (GB/s) | ours / raw | "
             "fit (us) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['colonnade_busbw_GBps'] / r['raw_busbw_GBps']:.3f}" if r["colonnade_busbw_GBps"] else "—"
        ours = f"{r['colonnade_busbw_GBps']:.3f}" if r["colonnade_busbw_GBps"] else "—"
        lines.append(f"| {r['op']} | {r['bytes']} | {r['raw_s'] * 1e6:.1f} | {r['raw_algbw_GBps']:.3f} | "
                     f"{r['raw_busbw_GBps']:.3f} | {ours} | {ratio} | "
                     f"{predict_seconds(fits[r['op']], r['bytes']) * 1e6:.1f} |")
    return "\n".join(lines + ["", summary(rows, fits)]), fits


def summary(rows: list[dict], fits: dict) -> str:
    """Per collective: colonnade / raw bus bandwidth over the sizes >= 1 MiB (median, and the range, which
    shows the run-to-run noise), and the latency + bandwidth fit."""
    lines = ["Per collective: colonnade busbw / raw busbw over message sizes >= 1 MiB (median and range), and "
             "the latency + bandwidth fit of the raw times.", "",
             "| op | ours / raw, median | range | fit latency (us) | fit bandwidth (GB/s) |", "|---|---|---|---|---|"]
    for op, fit in fits.items():
        ratios = sorted(r["colonnade_busbw_GBps"] / r["raw_busbw_GBps"] for r in rows
                        if r["op"] == op and r["colonnade_busbw_GBps"] and r["bytes"] >= 2**20)
        median = f"{statistics.median(ratios):.3f}" if ratios else "—"
        spread = f"{ratios[0]:.2f}–{ratios[-1]:.2f}" if ratios else "—"
        lines.append(f"| {op} | {median} | {spread} | {fit['alpha_s'] * 1e6:.0f} | {fit['bandwidth_Bps'] / 1e9:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench comm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--min-size", default="1K")
    parser.add_argument("--max-size", default="64M")
    parser.add_argument("--iters", type=int, default=20, help="iterations at 1 MiB (scaled by size)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating raw/colonnade rounds per size (medians)")
    parser.add_argument("--out", default="bench/results")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if ran_as_worker(args, worker):
        return {}
    from bench.machine import describe, slug

    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "rows.json"
        from bench.launch import torchrun

        proc = torchrun("bench.comm", args.nproc, ["--worker", "--out-file", str(out_file), "--ops", args.ops,
                                                   "--min-size", args.min_size, "--max-size", args.max_size,
                                                   "--iters", str(args.iters), "--rounds", str(args.rounds)],
                        threads=1)
        if proc.returncode != 0:
            raise RuntimeError(f"comm benchmark failed:\n{proc.stderr[-4000:]}")
        rows = json.loads(out_file.read_text())
    table, fits = report(rows)
    machine = describe()
    result = {"benchmark": "comm", "machine": machine, "nproc": args.nproc, "rows": rows, "fit": fits}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"comm-{slug(machine)}.json").write_text(json.dumps(result, indent=2))
    (out / f"comm-{slug(machine)}.md").write_text(table + "\n")
    print(table)
    for op, fit in fits.items():
        print(f"{op}: latency {fit['alpha_s'] * 1e6:.0f} us, bandwidth {fit['bandwidth_Bps'] / 1e9:.2f} GB/s")
    return result


if __name__ == "__main__":
    main()
