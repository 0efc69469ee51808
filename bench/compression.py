"""Data-parallel gradient compression (``parallel.grad_compression``, issue 35): convergence and bytes sent.

    python -m bench compression --out bench/results/compression-cpu
    python -m bench compression --quick --parts zero0 --out /tmp/compression

Parts (``--parts``; each mode a fresh ``training.run``, what train.py runs, from the same seed):

- ``dp2``: configs/quickstart.yaml (GPT-2 4x128 from scratch, BPE, seq 128, micro-batch 8, ZeRO-1) for ``--steps``
  steps at DP=2, eval every ``--eval-every``, for every mode of ``--modes`` (none, bf16, int8, int4, int4-noef =
  int4 with ``parallel.error_feedback=false``);
- ``tp2``: the same at TP=2 x DP=2 (4 processes) for none and int8;
- ``zero0`` / ``zero0-tp2``: the same model at ZeRO-0 for ``--zero0-steps`` steps, only to count bytes (none,
  bf16, int8, int4 at DP=2; none and int8 at TP=2 x DP=2);
- ``translation``: configs/translation_toy.yaml (T5) at ``parallel.tensor=1`` x DP=2 for ``--translation-steps``
  steps, none and int8, final BLEU.

Per run, from its metrics.jsonl: the eval-loss and training-loss curves, the final eval loss (and BLEU), and the
medians over the logged steps of ``dp_bytes_sent``, ``step_time_s`` and ``tokens_per_s``; ratios to ``none`` of
the same part, and at ZeRO-1 the gradient-only bytes ratio (``BYTES_NOTE``). The runs of one world size share one
torchrun launch; ``--from-results`` rewrites the report and plots of a results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.launch import add_worker_arguments, ran_as_worker

PROG = "python -m bench compression"
QUICKSTART, TRANSLATION = "configs/quickstart.yaml", "configs/translation_toy.yaml"
MODES = {"none": ("none", True), "bf16": ("bf16", True), "int8": ("int8", True), "int4": ("int4", True),
         "int4-noef": ("int4", False)}
# part: (config, processes, sets, modes it runs, what it is)
PARTS = {
    "zero0": (QUICKSTART, 2, ["parallel.zero_stage=0"], ("none", "bf16", "int8", "int4"), "GPT-2, ZeRO-0, DP=2"),
    "translation": (TRANSLATION, 2, ["parallel.tensor=1"], ("none", "int8"), "T5 toy translation, ZeRO-1, DP=2"),
    "dp2": (QUICKSTART, 2, [], tuple(MODES), "GPT-2, ZeRO-1, DP=2"),
    "zero0-tp2": (QUICKSTART, 4, ["parallel.zero_stage=0", "parallel.tensor=2"], ("none", "int8"),
                  "GPT-2, ZeRO-0, TP=2 x DP=2"),
    "tp2": (QUICKSTART, 4, ["parallel.tensor=2"], ("none", "int8"), "GPT-2, ZeRO-1, TP=2 x DP=2"),
}
ALLGATHER_FROM = {"dp2": "zero0", "tp2": "zero0-tp2"}  # ZeRO-1 part: its ZeRO-0 twin
LOSS_BARS = {"bf16": 0.01, "int8": 0.01, "int4": 0.02}  # |final eval loss / none's - 1|
BYTE_BARS = {"bf16": 0.51, "int8": 0.27, "int4": 0.15}  # ZeRO-0 bytes / none's
BLEU_BAR = 1.0
QUICK_MODEL = ["model.tokenizer=byte", "model.config={n_layer: 2, n_head: 2, n_embd: 64, n_positions: 128}",
               'data.train_files=["{stdlib}/a*.py"]', 'data.valid_files=["{stdlib}/z*.py"]', "train.eval_batches=2"]
QUICK_TRANSLATION = ["eval.bleu_samples=4", "eval.max_new_tokens=4"]
BYTES_NOTE = (
    "`dp_bytes_sent` is what one rank sent over its data-parallel group in a step, counted by the flight recorder as "
    "ring algorithms send (an all-reduce of N bytes over n ranks sends 2 (n-1)/n N, a reduce-scatter or all-gather "
    "(n-1)/n N); the tables give the median over the logged steps (it is the same every step). At ZeRO-0 it is the "
    "gradient mean alone: a ring all-reduce of fp32 for none, the compressed reduce-scatter + all-gather otherwise, "
    "whose payload per value is 2 bytes (bf16), 1 byte (int8) or half a byte (int4) plus a 4-byte fp32 scale per block"
    " of 128 values: 0.5, 0.258 and 0.133 of fp32. At ZeRO-1/2 compression replaces the gradient all-reduce by a "
    "compressed reduce-scatter only (each rank keeps the fp32 mean of its own partition), so the gradient part is half"
    " the above (0.25, 0.129, 0.066 of none's all-reduce); but the step's bytes also hold DeepSpeed's all-gather of "
    "the updated fp32 parameters after the optimizer step, which compression does not touch (1/3 of none's bytes). It "
    "is measured on the same model and layout as allgather = bytes(ZeRO-1 none) - bytes(ZeRO-0 none), and the "
    "gradient-only ratio is (bytes(mode) - allgather) / (bytes(none) - allgather). At ZeRO-0 the gradient-only ratio "
    "is the total ratio.")
FEWER_STEPS = (" (issue 35 asks for 600 GPT-2 steps; fewer here so that the whole bench fits in about 45 minutes of "
               "wall time on the shared box)")
COMMON = ["train.resume=null", "train.save_final=false", "train.export_hf=false", "train.progress=false",
          "logging.wandb.mode=disabled"]


# --- the worker: every run of one world size, one after another in the same process group ---------------------
def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from training import run
    from training.config import load
    from training.lifecycle import init_distributed

    init_distributed()
    for item in json.loads(Path(args.plan_file).read_text()):
        started = time.perf_counter()
        run(load(item["config"], item["sets"]))
        if dist.get_rank() == 0:
            with open(args.out_file, "a") as done:
                done.write(json.dumps({"name": item["name"], "wall_s": time.perf_counter() - started}) + "\n")


# --- the plan ----------------------------------------------------------------------------------------------------
def part_steps(args: argparse.Namespace, part: str) -> tuple[int, int]:
    """(steps, eval_every) of ``part``'s runs."""
    if part.startswith("zero0"):
        return args.zero0_steps, args.zero0_steps
    if part == "translation":
        return args.translation_steps, max(1, args.translation_steps // 3)
    return args.steps, args.eval_every


def plan(args: argparse.Namespace, scratch: Path) -> list[dict]:
    """Every run: its name, part, mode, config, processes and ``--set`` overrides, in launch order."""
    from training.config import load

    items = []
    for part in (p for p in PARTS if p in args.parts):
        config, world, sets, modes, _ = PARTS[part]
        steps, eval_every = part_steps(args, part)
        warmup = min(load(config).optim.warmup_steps, max(1, steps // 10))
        extra = (QUICK_MODEL if config == QUICKSTART else QUICK_TRANSLATION) if args.quick else []
        for mode in (m for m in modes if m in args.modes):
            codec, feedback = MODES[mode]
            name = f"{part}-{mode}"
            items.append({"name": name, "part": part, "mode": mode, "config": config, "world": world,
                          "sets": [*sets, *extra, *args.sets, *COMMON, f"train.steps={steps}",
                                   f"train.eval_every={eval_every}", f"optim.warmup_steps={warmup}",
                                   f"train.output_dir={scratch / name}",
                                   f"parallel.grad_compression={codec}", f"parallel.error_feedback={feedback}"]})
    return items


def launch(world: int, items: list[dict], scratch: Path) -> dict:
    """One torchrun launch of ``world`` processes running ``items``: its wall time, the runs finished (with their
    wall times) and its error, if any, as one line."""
    from bench.launch import first_error, torchrun

    plan_file, done_file = scratch / f"plan-{world}.json", scratch / f"done-{world}.jsonl"
    plan_file.write_text(json.dumps(items))
    print(f"{PROG}: {world} processes: {', '.join(i['name'] for i in items)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = torchrun("bench.compression", world, ["--worker", "--plan-file", str(plan_file), "--out-file",
                                                  str(done_file)])
    done = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.exists() else []
    error = None if proc.returncode == 0 else first_error(proc.stdout + "\n" + proc.stderr)
    return {"world": world, "wall_s": time.perf_counter() - started, "runs": done, "error": error}


# --- what a run measured -----------------------------------------------------------------------------------------
def median_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize_run(output_dir: Path) -> dict:
    """The curves, the final eval loss (and BLEU) and the per-step medians of one run's metrics.jsonl."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    return {"steps": train[-1]["step"] if train else 0,
            "train_curve": [[r["step"], r["loss"]] for r in train],
            "eval_curve": [[r["step"], r["eval_loss"]] for r in evals],
            "bleu_curve": [[r["step"], r["bleu"]] for r in evals if "bleu" in r],
            "first_eval_loss": evals[0]["eval_loss"] if evals else None,
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "final_bleu": evals[-1].get("bleu") if evals else None,
            "dp_bytes_sent": median_of(train, "dp_bytes_sent"),
            "step_time_s": median_of(train, "step_time_s"), "tokens_per_s": median_of(train, "tokens_per_s")}


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base; None when either is missing or base is 0."""
    return None if value is None or not base else value / base


def gradient_only_ratio(total: float, total_none: float, allgather: float) -> float | None:
    """(total - allgather) / (total_none - allgather): the bytes ratio with the parameter all-gather that
    ZeRO-1/2 sends after the step (the same with and without compression) taken out of both."""
    return ratio(total - allgather, total_none - allgather)


def add_ratios(parts: dict[str, dict[str, dict]]) -> dict[str, float]:
    """Each run's ratios to ``none`` of its part (loss, BLEU difference, bytes, gradient-only bytes at ZeRO-1
    from the all-gather of ``ALLGATHER_FROM``), in place; returns the all-gather bytes per ZeRO-1 part."""
    allgather = {}
    for part, twin in ALLGATHER_FROM.items():
        one, zero = parts.get(part, {}).get("none"), parts.get(twin, {}).get("none")
        if one and zero and one["dp_bytes_sent"] is not None and zero["dp_bytes_sent"] is not None:
            allgather[part] = one["dp_bytes_sent"] - zero["dp_bytes_sent"]
    for part, runs in parts.items():
        base = runs.get("none", {})
        for run in runs.values():
            run["loss_ratio"] = ratio(run["final_eval_loss"], base.get("final_eval_loss"))
            run["bytes_ratio"] = ratio(run["dp_bytes_sent"], base.get("dp_bytes_sent"))
            if run["final_bleu"] is not None and base.get("final_bleu") is not None:
                run["bleu_difference"] = run["final_bleu"] - base["final_bleu"]
            if part.startswith("zero0"):
                run["gradient_only_ratio"] = run["bytes_ratio"]
            elif part in allgather and run["dp_bytes_sent"] is not None:
                run["gradient_only_ratio"] = gradient_only_ratio(run["dp_bytes_sent"], base["dp_bytes_sent"],
                                                                 allgather[part])
    return allgather


def bars(parts: dict[str, dict[str, dict]]) -> list[dict]:
    """Issue 35's bars, each with its value and PASS (True) / FAIL (False); a missing value fails."""
    out = []

    def bar(name: str, value: float | None, limit: str, holds) -> None:
        out.append({"bar": name, "value": value, "limit": limit, "pass": value is not None and bool(holds(value))})

    for part in ("dp2", "tp2"):
        for mode, tol in LOSS_BARS.items():
            if mode in parts.get(part, {}):
                bar(f"{part} {mode}: final eval loss / none", parts[part][mode]["loss_ratio"],
                    f"within {tol:.0%} of 1", lambda v, tol=tol: abs(v - 1) <= tol + 1e-12)
    for part in ("zero0", "zero0-tp2"):
        for mode, limit in BYTE_BARS.items():
            if mode in parts.get(part, {}):
                bar(f"{part} {mode}: dp_bytes_sent / none", parts[part][mode]["bytes_ratio"], f"<= {limit}",
                    lambda v, limit=limit: v <= limit)
    translation = parts.get("translation", {})
    if "int8" in translation:
        bar("translation int8: final BLEU - none's", translation["int8"].get("bleu_difference"),
            f"within {BLEU_BAR:g} BLEU point", lambda v: abs(v) <= BLEU_BAR)
    for mode, run in translation.items():
        bar(f"translation {mode}: trains (final eval loss / first)", ratio(run["final_eval_loss"],
            run["first_eval_loss"]), "< 1", lambda v: v < 1)
    return out


# --- the report --------------------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".4f") -> str:
    return "" if value is None else format(value, spec)


def part_table(part: str, runs: dict[str, dict], allgather: float | None) -> list[str]:
    lines = [f"### {part}: {PARTS[part][4]}, {next(iter(runs.values()))['steps']} steps", "",
             "| mode | final eval loss | / none | BLEU | dp_bytes_sent / step | / none | gradient-only / none "
             "| step s | tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, r in runs.items():
        lines.append(f"| {mode} | {_fmt(r['final_eval_loss'])} | {_fmt(r.get('loss_ratio'))} | "
                     f"{_fmt(r['final_bleu'], '.2f')} | {_fmt(r['dp_bytes_sent'], ',.0f')} | "
                     f"{_fmt(r.get('bytes_ratio'), '.3f')} | {_fmt(r.get('gradient_only_ratio'), '.3f')} | "
                     f"{_fmt(r['step_time_s'], '.3f')} | {_fmt(r['tokens_per_s'], ',.0f')} |")
    if allgather is not None:
        lines += ["", f"Parameter all-gather in every step's bytes: {allgather:,.0f} "
                      f"({ratio(allgather, runs['none']['dp_bytes_sent']):.3f} of none's total)."]
    return lines + [""]


def report(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"# Data-parallel gradient compression: convergence and bytes ({m['date']})", "",
             f"`{result['command']}`", "",
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; fp32. Bench wall time "
             f"{result['wall_s'] / 60:.1f} min. Steps: {s['steps']} (GPT-2, eval every {s['eval_every']}), "
             f"{s['zero0_steps']} (ZeRO-0 byte counts), {s['translation_steps']} (translation)"
             f"{'; --quick (tiny model)' if s['quick'] else ''}"
             f"{FEWER_STEPS if s['steps'] < 600 and not s['quick'] else ''}.", "",
             "Step times and tokens/s are CPU numbers on a shared 2-core box (another bench and tests ran at the "
             "same time; 4-process layouts oversubscribe the cores): they say nothing about speed. The bytes and "
             "the losses are what this bench is for.", "", "## Bars", "", "| bar | value | limit | result |",
             "|---|---|---|---|"]
    lines += [f"| {b['bar']} | {_fmt(b['value'], '.4f')} | {b['limit']} | {'PASS' if b['pass'] else 'FAIL'} |"
              for b in result["bars"]]
    lines += ["", "## Runs", ""]
    for part, runs in result["parts"].items():
        lines += part_table(part, runs, result["allgather_bytes"].get(part))
    lines += ["## How the bytes are counted", "", BYTES_NOTE, ""]
    for launched in result["launches"]:
        lines.append(f"- launch of {launched['world']} processes: {launched['wall_s'] / 60:.1f} min, runs "
                     + ", ".join(f"{r['name']} {r['wall_s']:.0f} s" for r in launched["runs"])
                     + (f"; error: {launched['error']}" if launched["error"] else ""))
    lines += ["", "Curves: eval_loss.png (eval loss vs step), train_loss.png (training loss vs step)."]
    return "\n".join(lines) + "\n"


def plot(result: dict, key: str, ylabel: str, path: Path) -> None:
    """One PNG: ``key`` (a curve) vs step of every mode, one panel per part that trains to converge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in ("dp2", "tp2", "translation") if p in result["parts"]]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4.2), squeeze=False)
    for ax, part in zip(axes[0], shown):
        for mode, run in result["parts"][part].items():
            curve = run[key]
            ax.plot([c[0] for c in curve], [c[1] for c in curve], label=mode, marker="." if len(curve) < 20 else None,
                    linestyle="--" if mode == "int4-noef" else "-")
        ax.set_title(PARTS[part][4], fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: str | None) -> None:
    from bench.machine import publish

    publish(result, report(result), out)
    if out:
        plot(result, "eval_curve", "eval loss", Path(out) / "eval_loss.png")
        plot(result, "train_curve", "training loss", Path(out) / "train_loss.png")


# --- the command -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="directory for results.json, report.md and the PNGs")
    parser.add_argument("--steps", type=int, default=None, help="GPT-2 steps of dp2 and tp2 (default 600; quick 4)")
    parser.add_argument("--eval-every", type=int, default=None, help="default 100 (quick 2)")
    parser.add_argument("--zero0-steps", type=int, default=None, help="default 20 (quick 2)")
    parser.add_argument("--translation-steps", type=int, default=None, help="default 600 (quick 4)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override added to every run, e.g. --set train.seed=1 (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a tiny GPT-2 (2 layers x 64, byte-level), few steps")
    parser.add_argument("--scratch", default=None, help="directory for the runs (default: the system's temporary)")
    parser.add_argument("--from-results", default=None, help="rewrite report and PNGs from a results.json, no runs")
    parser.add_argument("--plan-file", help=argparse.SUPPRESS)
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    quick = {"steps": 4, "eval_every": 2, "zero0_steps": 2, "translation_steps": 4}
    full = {"steps": 600, "eval_every": 100, "zero0_steps": 20, "translation_steps": 600}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def checked(args: argparse.Namespace) -> None:
    """Bad input as one line (exit code 2) before the first launch."""
    from bench.cli import fail

    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for flag, given, known in (("--modes", args.modes, MODES), ("--parts", args.parts, PARTS)):
        unknown = [x for x in given if x not in known]
        if unknown or not given:
            fail(PROG, f"{flag} {','.join(given)}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                       f"choose from {', '.join(known)}")
    if "none" not in args.modes:
        fail(PROG, f"--modes {','.join(args.modes)}: every ratio is to none; add none")
    for flag in ("steps", "eval_every", "zero0_steps", "translation_steps"):
        if getattr(args, flag) < 1:
            fail(PROG, f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.scratch is not None and not Path(args.scratch).is_dir():
        fail(PROG, f"--scratch {args.scratch}: not a directory; create it or leave --scratch out")


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    from bench.cli import check_config

    items = plan(args, scratch)
    for item in items:
        check_config(PROG, item["config"], item["sets"], item["world"])
    launches = [launch(world, [i for i in items if i["world"] == world], scratch)
                for world in sorted({i["world"] for i in items})]
    finished = {r["name"] for launched in launches for r in launched["runs"]}
    parts: dict[str, dict] = {}
    for item in items:
        if item["name"] in finished:
            parts.setdefault(item["part"], {})[item["mode"]] = summarize_run(scratch / item["name"])
    return {"launches": launches, "parts": parts, "plan": [{k: i[k] for k in ("name", "world", "sets")}
                                                             for i in items]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if ran_as_worker(args, worker):
        return {}
    if args.from_results:
        result = json.loads(Path(args.from_results).read_text())
        result["allgather_bytes"] = add_ratios(result["parts"])
        result["bars"] = bars(result["parts"])
        write(result, args.out)
        return result
    checked(args)
    from bench.machine import describe

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.scratch, prefix="bench-compression-") as name:
        measured = measure(args, Path(name))
    result = {"machine": describe(), "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]),
              "settings": {k: getattr(args, k) for k in ("steps", "eval_every", "zero0_steps", "translation_steps",
                                                         "modes", "parts", "quick", "sets")},
              "wall_s": time.perf_counter() - started, **measured}
    result["allgather_bytes"] = add_ratios(result["parts"])
    result["bars"] = bars(result["parts"])
    write(result, args.out)
    errors = [f"launch of {x['world']}: {x['error']}" for x in measured["launches"] if x["error"]]
    if errors:
        raise SystemExit(f"{PROG}: " + "; ".join(errors))
    return result


if __name__ == "__main__":
    main()
