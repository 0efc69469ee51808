"""The optimizer step an offloaded run takes on the host: our AdamW (torch's, fused or foreach) against
DeepSpeed's ``DeepSpeedCPUAdam``, on the same fp32 partition, timed in the same process.

    python -m bench cpu_adam --params 50e6 --out bench/results/cpu-adam-cpu

``parallel.offload`` keeps our AdamW (``zero_force_ds_cpu_optimizer: false``): this measures what that costs.
Every candidate starts from the same weights and gradients and takes the same steps; the final weights are
compared with torch's as a check that the candidates compute the same update."""

from __future__ import annotations

import argparse
import statistics
import time


def _candidates() -> dict:
    import torch

    def torch_adamw(**kind):
        return lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.1, **kind)

    def deepspeed_cpu_adam(params, lr):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=0.1, adamw_mode=True)

    return {"torch AdamW (foreach)": torch_adamw(foreach=True), "torch AdamW (fused)": torch_adamw(fused=True),
            "DeepSpeedCPUAdam": deepspeed_cpu_adam}


def time_optimizer(make, numel: int, steps: int, warmup: int, seed: int = 0) -> tuple[list[float], object]:
    """Seconds per step of ``make([param], lr)`` on one fp32 parameter of ``numel`` elements, with a fixed
    gradient; returns the step times and the final weights."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(numel, generator=generator))
    param.grad = torch.randn(numel, generator=generator) * 1e-2
    optimizer = make([param], 1e-3)
    seconds = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        optimizer.step()
        if step >= warmup:
            seconds.append(time.perf_counter() - started)
    return seconds, param.detach()


def run(numel: int, steps: int, warmup: int, threads: int) -> dict:
    import torch

    from bench.machine import describe

    torch.set_num_threads(threads)
    rows, reference = [], None
    for name, make in _candidates().items():
        try:
            seconds, weights = time_optimizer(make, numel, steps, warmup)
        except Exception as exc:  # e.g. DeepSpeed's op cannot be built here: reported, not fatal
            rows.append({"optimizer": name, "status": f"failed: {type(exc).__name__}: {str(exc)[:200]}"})
            continue
        reference = weights if reference is None else reference
        rows.append({"optimizer": name, "status": "ok", "step_s": statistics.median(seconds),
                     "max_abs_diff_vs_first": float((weights - reference).abs().max())})
    baseline = next(r["step_s"] for r in rows if r["status"] == "ok")
    for row in rows:
        if row["status"] == "ok":
            row["vs_first"] = row["step_s"] / baseline
            row["params_per_s"] = numel / row["step_s"]
    return {"machine": describe(), "params": numel, "steps": steps, "warmup": warmup, "threads": threads,
            "rows": rows}


def report(result: dict) -> str:
    machine = result["machine"]
    lines = [f"# Host optimizer step: {result['params']:,} fp32 parameters", "",
             f"{machine['cpu']}, {machine['cores']} cores ({result['threads']} threads), torch {machine['torch']}, "
             f"{machine['date']}; median of {result['steps']} steps after {result['warmup']} warm-up.", "",
             "| optimizer | step s | × first row | parameters / s | max abs diff vs first row |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['optimizer']} | {r['status']} | | | |")
            continue
        lines.append(f"| {r['optimizer']} | {r['step_s']:.4f} | {r['vs_first']:.2f} | {r['params_per_s']:.3g} | "
                     f"{r['max_abs_diff_vs_first']:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import os

    parser = argparse.ArgumentParser(prog="python -m bench cpu_adam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=50e6, help="fp32 elements in the partition (default 50e6)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", help="directory for results.json and report.md")
    args = parser.parse_args(argv)
    if args.params < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        from bench.cli import fail

        fail("bench cpu_adam", f"--params {args.params:g}, --steps {args.steps}, --threads {args.threads}, --warmup "
                               f"{args.warmup}: --params, --steps and --threads must be positive, --warmup >= 0")
    result = run(int(args.params), args.steps, args.warmup, args.threads)
    from bench.machine import publish

    publish(result, report(result), args.out)
