"""What a checkpoint costs the step loop: no saves, synchronous saves, and ``train.async_save``, on the same
run, timed in the same process.

    python -m bench async_save --out bench/results/async-save-cpu

Each variant trains the same GPT-2 for ``--steps`` steps, saving every ``--save-every`` (the async variant's
last save is waited for before the clock stops: the clock is the run's ``train`` phase; the default leaves steps
after it, as in a long run). The variants alternate over ``--rounds`` (none, sync, async, async, sync, none, ...).
Reported: the median wall time of each variant's step loop, the cost per save ((variant - no saves) / saves), the
async/sync ratio of that cost, and the loop's own ``checkpoint_s`` records (how long each save held the step
loop)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from training.events import Observer

VARIANTS = ("none", "sync", "async")
HEADS = 8
PROG = "bench async_save"


def _config(args, out: Path, variant: str):
    from training.config import validate

    return validate({
        "model": {"arch": "gpt2", "tokenizer": "byte",
                  "config": {"n_layer": args.layers, "n_head": HEADS, "n_embd": args.hidden,
                             "n_positions": args.seq_len}},
        "data": {"train_files": [args.files], "seq_len": args.seq_len},
        "train": {"steps": args.steps, "micro_batch_size": 1, "output_dir": str(out), "progress": False,
                  "export_hf": False, "save_final": False, "save_every": 0 if variant == "none" else args.save_every,
                  "async_save": variant == "async"},
        "parallel": {"zero_stage": 1},
        "logging": {"wandb": {"mode": "disabled"}},
    })


class LoopTimer(Observer):
    """The run's ``train`` phase on the clock: the step loop, from the first step to the last save written
    (a background save's write included)."""

    def __init__(self):
        self.loop_s: float | None = None
        self._started = 0.0

    def on_phase_start(self, phase: str, step: int) -> None:
        if phase == "train":
            self._started = time.perf_counter()

    def on_phase_end(self, phase: str, step: int, record) -> None:
        if phase == "train":
            self.loop_s = time.perf_counter() - self._started


def time_variant(args, variant: str) -> dict:
    """One run of ``variant`` in a fresh output directory: its step-loop seconds and ``checkpoint_s`` records."""
    from training import run

    timer = LoopTimer()
    with tempfile.TemporaryDirectory(dir=args.scratch) as out:
        result = run(_config(args, Path(out), variant), observers=[timer])
    saves = [r["checkpoint_s"] for r in result.history if "checkpoint_s" in r]
    params = sum(p.numel() for p in result.model.parameters())
    return {"variant": variant, "loop_s": timer.loop_s, "checkpoint_s": saves, "params": params}


def run(args) -> dict:
    from bench.machine import describe

    order = [v for r in range(args.rounds) for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1])]
    runs = [time_variant(args, variant) for variant in order]
    params = runs[0]["params"]
    saves = args.steps // args.save_every
    median = {v: statistics.median(r["loop_s"] for r in runs if r["variant"] == v) for v in VARIANTS}
    per_save = {v: (median[v] - median["none"]) / saves for v in ("sync", "async")}
    blocked = {v: statistics.median(s for r in runs if r["variant"] == v for s in r["checkpoint_s"])
               for v in ("sync", "async")}
    return {"machine": describe(), "params": params, "checkpoint_bytes": params * 4 * 3, "steps": args.steps,
            "save_every": args.save_every, "saves_per_run": saves, "rounds": args.rounds, "runs": runs,
            "median_loop_s": median, "cost_per_save_s": per_save, "median_checkpoint_s": blocked,
            "async_over_sync": per_save["async"] / per_save["sync"] if per_save["sync"] > 0 else None}


def report(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Checkpoint cost to the step loop: GPT-2 of {result['params'] / 1e6:.1f} M parameters "
             f"({result['checkpoint_bytes'] / 1e9:.2f} GB of weights and AdamW moments per save)", "",
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}; one process, ZeRO-1, fp32; "
             f"{result['steps']} steps, a save every {result['save_every']} ({result['saves_per_run']} per run); "
             f"median of {result['rounds']} runs per variant, alternated.", "",
             "| variant | step loop s | cost per save s | save holds the loop s (median) |", "|---|---|---|---|"]
    for v in VARIANTS:
        cost = result["cost_per_save_s"].get(v)
        held = result["median_checkpoint_s"].get(v)
        lines.append(f"| {v} | {result['median_loop_s'][v]:.2f} | {'' if cost is None else f'{cost:.2f}'} | "
                     f"{'' if held is None else f'{held:.2f}'} |")
    ratio = result["async_over_sync"]
    lines += ["", f"async / sync cost per save: **{ratio:.2f}**" if ratio is not None else "sync saves cost nothing"]
    return "\n".join(lines) + "\n"


def _check(args) -> None:
    """Bad input as one line (exit code 2) before the first run."""
    from bench.cli import fail
    from training.config import ConfigError
    from training.data import expand_files

    for flag in ("layers", "hidden", "steps", "save_every", "rounds"):
        if getattr(args, flag) < 1:
            fail(PROG, f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.save_every > args.steps:
        fail(PROG, f"--save-every {args.save_every} exceeds --steps {args.steps}: each run must save; choose "
                   f"--save-every at most --steps")
    if args.hidden % HEADS:
        fail(PROG, f"--hidden {args.hidden} is not a multiple of the model's {HEADS} attention heads; choose e.g. "
                   f"{args.hidden // HEADS * HEADS or HEADS} or {(args.hidden // HEADS + 1) * HEADS}")
    if args.scratch is not None and not Path(args.scratch).is_dir():
        fail(PROG, f"--scratch {args.scratch}: not a directory; create it or leave --scratch out")
    try:
        expand_files([args.files], "--files")
        _config(args, Path("unused"), "async")
    except (ConfigError, OSError, ValueError) as exc:
        fail(PROG, str(exc))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench async_save", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="{stdlib}/[a-f]*.py", help="training text (glob)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15, help="default 15: the last save (step 12) has steps "
                        "after it to overlap, as every save of a long run has")
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scratch", default=None, help="directory for the runs' checkpoints (default: the system's)")
    parser.add_argument("--out", help="directory for results.json and report.md")
    args = parser.parse_args(argv)
    _check(args)
    result = run(args)
    from bench.machine import publish

    publish(result, report(result), args.out)


if __name__ == "__main__":
    main()
