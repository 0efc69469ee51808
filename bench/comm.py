"""Collective microbenchmarks: latency, algorithm and bus bandwidth per message size (nccl-tests formulas),
measured both through colonnade's communication layer and on raw ``torch.distributed`` so the harness's own
overhead is visible, plus a latency + bandwidth fit (time = alpha + bytes / bandwidth) per collective that
other benchmarks use to predict communication time.

    python -m bench comm --nproc 2 --max-size 64M --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    """Least-squares fit of time = alpha + beta * bytes; returns alpha (s) and bandwidth (bytes/s)."""
    n = len(points)
    mean_x = sum(b for b, _ in points) / n
    mean_y = sum(t for _, t in points) / n
    var = sum((b - mean_x) ** 2 for b, _ in points)
    beta = sum((b - mean_x) * (t - mean_y) for b, t in points) / var if var else 0.0
    alpha = max(0.0, mean_y - beta * mean_x)
    return {"alpha_s": alpha, "bandwidth_Bps": (1 / beta) if beta > 0 else float("inf")}


def predict_seconds(fit: dict, nbytes: int) -> float:
    return fit["alpha_s"] + nbytes / fit["bandwidth_Bps"]


def _time(fn, iters: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - started) / iters


def _operations(op: str, nbytes: int, rank: int, world: int, device, dtype):
    """(raw torch.distributed callable, colonnade-layer callable or None) moving ``nbytes`` per rank in the
    nccl-tests sense (all-gather: the gathered output; reduce-scatter: the input)."""
    import torch
    import torch.distributed as dist

    from parallel import comm
    from parallel.p2p import PipeComm

    elements = max(world, nbytes // torch.tensor([], dtype=dtype).element_size() // world * world)
    x = torch.ones(elements, dtype=dtype, device=device)
    shard = torch.ones(elements // world, dtype=dtype, device=device)
    group = dist.group.WORLD
    if op == "all_reduce":
        return (lambda: dist.all_reduce(x)), (lambda: comm._all_reduce(x, group))
    if op == "all_gather":
        parts = [torch.empty_like(shard) for _ in range(world)]
        return (lambda: dist.all_gather(parts, shard)), (lambda: comm._gather(shard, 0, group))
    if op == "reduce_scatter":
        chunks = list(x.chunk(world))
        out = torch.empty_like(shard)
        return (lambda: dist.reduce_scatter(out, chunks)), (lambda: comm._reduce_scatter(x, 0, group))
    if op == "broadcast":
        return (lambda: dist.broadcast(x, src=0)), None
    # send/recv between ranks 0 and 1 (others idle): raw blocking pair vs PipeComm (tagged, timed out)
    peer = 1 - rank if rank < 2 else None
    pipe = PipeComm([0, 1], rank, 1, tuple(x.shape), dtype, device) if rank < 2 else None

    def raw():
        if rank == 0:
            dist.send(x, dst=1)
        elif rank == 1:
            dist.recv(x, src=0)

    def ours():
        if rank == 0:
            pipe.send_forward(x, 0, 0)
            pipe.flush()
        elif rank == 1:
            pipe.recv_forward(1, 0)

    return (raw if peer is not None else (lambda: None)), (ours if peer is not None else (lambda: None))


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from training.loop import init_distributed

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    rows = []
    for op in args.ops.split(","):
        for nbytes in sizes_between(parse_size(args.min_size), parse_size(args.max_size)):
            iters = max(2, min(args.iters, int(args.iters * 2**20 / max(nbytes, 1))))
            raw, ours = _operations(op, nbytes, rank, world, device, torch.float32)
            dist.barrier()
            raw_s = _time(raw, iters, 2, sync)
            dist.barrier()
            ours_s = _time(ours, iters, 2, sync) if ours is not None else None
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
    return "\n".join(lines), fits


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench comm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--min-size", default="1K")
    parser.add_argument("--max-size", default="64M")
    parser.add_argument("--iters", type=int, default=20, help="iterations at 1 MiB (scaled by size)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    from bench.machine import describe, slug

    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "rows.json"
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(args.nproc), "-m",
               "bench.comm", "--worker", "--out-file", str(out_file), "--ops", args.ops, "--min-size",
               args.min_size, "--max-size", args.max_size, "--iters", str(args.iters)]
        proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
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
