"""Tensor parallelism on one box: TP=N with one process per core vs TP=1 with N threads, same model.

Each layout runs real colonnade training steps under torchrun (warm-up, then timed steps; median step
time). The TP collectives are timed by wrapping the ``torch.distributed`` calls that ``parallel.comm`` and
``parallel.cross_entropy`` make (on CPU/gloo a collective returns when it is done, so its wall time is its
cost, including waiting for the slower rank). Result: tokens/s per layout, their ratio, and the share of
step time spent in TP collectives.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.launch import add_worker_arguments, ran_as_worker

GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}


class TimedCollectives:
    """Stands in for ``torch.distributed`` inside our comm modules: times and counts the collectives."""

    TIMED = ("all_reduce", "all_gather", "reduce_scatter")

    def __init__(self, dist):
        self._dist = dist
        self.seconds = 0.0
        self.calls = 0
        self.bytes = 0

    def __getattr__(self, name):
        target = getattr(self._dist, name)
        if name not in self.TIMED:
            return target

        def timed(tensor_or_list, *args, **kwargs):
            started = time.perf_counter()
            out = target(tensor_or_list, *args, **kwargs)
            self.seconds += time.perf_counter() - started
            self.calls += 1
            first = args[0] if args and name == "reduce_scatter" else tensor_or_list
            tensors = first if isinstance(first, list) else [first]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            return out

        return timed


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import parallel.comm
    import parallel.cross_entropy
    from training import run
    from training.config import validate

    torch.set_num_threads(args.threads)
    timer = TimedCollectives(dist)
    parallel.comm.dist = timer
    parallel.cross_entropy.dist = timer
    cfg = validate({
        "model": {"arch": "gpt2", "tokenizer": "byte", "config": GPT2_SMALL},
        "data": {"train_files": [args.files], "seq_len": args.seq_len},
        "train": {"steps": args.warmup + args.steps, "micro_batch_size": args.micro_batch_size,
                  "output_dir": args.out_dir, "progress": False, "export_hf": False, "save_final": False},
        "optim": {"lr": 1e-4},
        "parallel": {"tensor": args.tensor, "zero_stage": 1},
        "logging": {"wandb": {"mode": "disabled"}},
    })
    history = run(cfg).history
    if dist.get_rank() == 0:
        steps = [r["step_time_s"] for r in history if "step_time_s" in r]
        Path(args.out_dir, "result.json").write_text(json.dumps({
            "step_s": steps, "tp_comm_s": timer.seconds, "tp_calls": timer.calls, "tp_bytes": timer.bytes}))


def launch(tensor: int, threads: int, args, tmp: Path) -> dict:
    out_dir = tmp / f"tp{tensor}"
    from bench.launch import torchrun

    proc = torchrun("bench.tp", tensor, ["--worker", "--tensor", str(tensor), "--threads", str(threads), "--out-dir",
                                         str(out_dir), "--files", args.files, "--seq-len", str(args.seq_len),
                                         "--micro-batch-size", str(args.micro_batch_size), "--warmup",
                                         str(args.warmup), "--steps", str(args.steps)], threads=threads)
    if proc.returncode != 0:
        raise RuntimeError(f"TP={tensor} run failed:\n{proc.stderr[-4000:]}")
    result = json.loads((out_dir / "result.json").read_text())
    timed = result["step_s"][args.warmup:]
    total = sum(result["step_s"])
    return {"tensor": tensor, "processes": tensor, "threads_per_process": threads,
            "median_step_s": statistics.median(timed),
            "tokens_per_s": args.micro_batch_size * args.seq_len / statistics.median(timed),
            "tp_comm_share": result["tp_comm_s"] / total, "tp_collectives": result["tp_calls"],
            "tp_bytes_per_step": result["tp_bytes"] / len(result["step_s"])}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench tp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensor", type=int, default=2, help="TP degree = processes = cores used")
    parser.add_argument("--files", default="{stdlib}/[a-f]*.py")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="bench/results")
    add_worker_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if ran_as_worker(args, worker):
        return {}

    from bench.machine import describe, slug

    with tempfile.TemporaryDirectory() as tmp:
        baseline = launch(1, args.tensor, args, Path(tmp))
        sharded = launch(args.tensor, 1, args, Path(tmp))
    machine = describe()
    result = {"benchmark": "tp", "machine": machine, "model": GPT2_SMALL, "args": vars(args),
              "tp1": baseline, f"tp{args.tensor}": sharded,
              "throughput_ratio": sharded["tokens_per_s"] / baseline["tokens_per_s"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tp-{slug(machine)}.json").write_text(json.dumps(result, indent=2))
    for r in (baseline, sharded):
        print(f"TP={r['tensor']} ({r['processes']} process x {r['threads_per_process']} threads): "
              f"{r['tokens_per_s']:.0f} tok/s, median step {r['median_step_s']:.2f} s, TP collectives "
              f"{r['tp_comm_share']:.1%} of step time ({r['tp_bytes_per_step'] / 2**20:.1f} MiB/step)")
    print(f"throughput ratio TP={args.tensor} / TP=1 = {result['throughput_ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
