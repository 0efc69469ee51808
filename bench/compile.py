"""``train.compile`` against eager on the quickstart run, in one process, on the same machine:

    python -m bench compile --out bench/results/compile-cpu

The quickstart config (``configs/quickstart.yaml``: GPT-2 4 x 128 from scratch, BPE, seq 128, micro-batch 8, fp32,
ZeRO-1) on one process for ``--steps`` steps, eager and compiled alternated over ``--rounds`` (eager, compiled,
compiled, eager, ...). Each compiled run starts from empty dynamo caches and an inductor cache of this command's own
(a fresh directory), so each compiles as a first run does; the second one finds the first's kernels on disk.
Reported per variant: tokens/s of the median step after the first ``--warmup`` (median of the runs), the warm-up
steps' seconds (the compilation, against eager's same steps) and the peak resident memory (``RssAnon``, CPU; the
allocator's peak on a GPU) over the timed steps. The BPE tokenizer is trained by the first run and reused."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from training.events import Observer

VARIANTS = ("eager", "compiled")
PROG = "bench compile"
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


class StepTimes(Observer):
    """Every step's seconds and tokens/s, and the peak memory of the steps after ``warmup``."""

    def __init__(self, warmup: int):
        from bench.memory import PhasePeaks

        self.warmup = warmup
        self.records: list[dict] = []
        self.peaks = PhasePeaks()

    def on_phase_start(self, phase: str, step: int) -> None:
        if phase == "step" and step == self.warmup + 1:
            self.peaks.start("timed")

    def on_phase_end(self, phase: str, step: int, record) -> None:
        if phase == "step":
            self.records.append(record)
        elif phase == "train":
            self.peaks.end()


def _config(args, out: Path, compiled: bool, tokenizer: Path | None):
    from training.config import load

    sets = [f"train.steps={args.steps}", f"train.output_dir={out}", "train.progress=false", "train.export_hf=false",
            "train.save_final=false", f"train.eval_every={args.steps}", "train.eval_batches=2", "train.resume=null",
            "logging.wandb.mode=disabled", f"train.compile={str(compiled).lower()}",
            *([f"model.tokenizer={tokenizer}"] if tokenizer is not None else []), *args.set]
    return load(args.config, sets)


def time_variant(args, variant: str, scratch: Path, tokenizer: Path | None) -> dict:
    """One run of ``variant`` in a fresh output directory: its steps' times and the timed steps' peak memory."""
    import torch

    from training import run

    torch._dynamo.reset()  # each compiled run compiles, as a new process would
    times = StepTimes(args.warmup)
    out = Path(tempfile.mkdtemp(dir=scratch))
    run(_config(args, out, variant == "compiled", tokenizer), observers=[times])
    timed = times.records[args.warmup:]
    return {"variant": variant, "tokenizer": str(out / "tokenizer"),
            "warmup_s": sum(r["step_time_s"] for r in times.records[:args.warmup]),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),  # robust to a neighbour's burst
            "peak_mb": times.peaks.peaks["timed"] / 2**20, "added_mb": times.peaks.added["timed"] / 2**20,
            "losses": [r["loss"] for r in times.records]}


def run(args) -> dict:
    from bench.machine import describe

    order = [v for r in range(args.rounds) for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1])]
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(scratch) / "inductor")  # cold: this command's own
        runs, tokenizer = [], None
        for variant in order:
            runs.append(time_variant(args, variant, Path(scratch), tokenizer))
            tokenizer = tokenizer or Path(runs[0]["tokenizer"])
    median = {v: {key: statistics.median(r[key] for r in runs if r["variant"] == v)
                  for key in ("tokens_per_s", "warmup_s", "peak_mb", "added_mb")} for v in VARIANTS}
    loss_gap = max(abs(a / b - 1) for e in runs if e["variant"] == "eager" for c in runs if c["variant"] == "compiled"
                   for a, b in zip(c["losses"], e["losses"]))
    return {"machine": describe(), "config": str(args.config), "sets": args.set, "steps": args.steps,
            "warmup": args.warmup, "rounds": args.rounds, "runs": runs, "median": median,
            "ratio": median["compiled"]["tokens_per_s"] / median["eager"]["tokens_per_s"],
            "compile_s": [c["warmup_s"] - median["eager"]["warmup_s"] for c in runs if c["variant"] == "compiled"],
            "loss_gap": loss_gap}


def report(result: dict) -> str:
    m, median = result["machine"], result["median"]
    lines = [f"# train.compile against eager: {Path(result['config']).name}"
             f"{' ' + ' '.join(result['sets']) if result['sets'] else ''}", "",
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}; one process; {result['steps']} "
             f"steps per run, the first {result['warmup']} (compilation) not timed; median of {result['rounds']} "
             f"runs per variant, alternated.", "",
             "| variant | tokens/s | warm-up steps s | peak memory MB (above the timed steps' start) |",
             "|---|---|---|---|"]
    for v in VARIANTS:
        row = median[v]
        lines.append(f"| {v} | {row['tokens_per_s']:,.0f} | {row['warmup_s']:.1f} | {row['peak_mb']:,.0f} "
                     f"({row['added_mb']:,.0f}) |")
    compile_s = ", ".join(f"{s:.1f}" for s in result["compile_s"])
    lines += ["", f"compiled / eager tokens/s: **{result['ratio']:.2f}x**; compilation (warm-up steps over eager's): "
              f"{compile_s} s per compiled run (the later ones find the first's kernels on disk); largest relative "
              f"loss difference of any step: {result['loss_gap']:.1e}"]
    return "\n".join(lines) + "\n"


def _check(args) -> None:
    """Bad input as one line (exit code 2) before the first run."""
    from bench.cli import fail
    from training.config import ConfigError

    for flag in ("steps", "rounds"):
        if getattr(args, flag) < 1:
            fail(PROG, f"--{flag} {getattr(args, flag)}: must be at least 1")
    if not 0 <= args.warmup < args.steps:
        fail(PROG, f"--warmup {args.warmup}: must be at least 0 and below --steps {args.steps}, so that steps are "
                   f"timed; raise --steps or lower --warmup")
    try:
        _config(args, Path("unused"), True, None)
    except (ConfigError, OSError, ValueError) as exc:
        fail(PROG, str(exc))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(QUICKSTART))
    parser.add_argument("--set", action="append", default=[], help="a config override, as train.py's --set")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed (the compilation: step 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="directory for results.json and report.md")
    args = parser.parse_args(argv)
    _check(args)
    result = run(args)
    from bench.machine import publish

    publish(result, report(result), args.out)


if __name__ == "__main__":
    main()
