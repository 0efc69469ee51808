"""Memory per rank before any run, and the layouts that fit a machine.

    python -m bench plan --config configs/memory_gpt2.yaml --layout tensor=2,pipeline=2 --layout data=2,zero=2
    python -m bench plan --config configs/plan_llama7b.yaml --device cuda --device-memory 40GiB --world-size 8
    python -m bench plan --check bench/results/plan-grid-cpu/results.json

For each layout and each pipeline stage (the tensor-parallel ranks of a stage hold the same amounts):

- **model state**: this rank's parameters, counted on the real model (built on the meta device and cut by the
  run's own tensor-parallel plan and pipeline split, under a fake process group of the layout's size: no
  weights, no other process), times the bytes of weights, gradients, AdamW moments and DeepSpeed's fp32 master
  partition under the ZeRO stage and precision (``model_state_bytes``);
- **activations**: one micro-batch of each of this rank's chunks runs forward and backward on the meta device
  under the same fake group (TorchTitan's former estimator did the same with fake tensors): ``LiveBytes`` counts
  every tensor the operations make until it is freed. That gives what autograd keeps per micro-batch (with the
  run's recomputation mode, sequence parallelism, vocabulary-parallel loss) and the peak the forward and the
  backward add on top of it. The schedule's own operation list (``parallel.schedules.ORDERS``) says how many
  micro-batches of each chunk are in flight when;
- **transients of the step**: under ZeRO 1-2, the fp32 gradient partition DeepSpeed flattens for its optimizer
  (4 bytes per parameter / data-parallel degree); with pipelines and tied embeddings, the first and last
  stages' embedding-gradient buffers (``training.pipeline``: one kept over the step, two more at the sync).

The planned peak is the largest of the steps (model state + activations in flight + the running operation's
transient) and the optimizer step (model state + its transient); ``bench memory`` measures the same quantity
above the process's fixed runtime (interpreter, torch, DeepSpeed), which the plan leaves out.

With ``--device-memory`` and ``--world-size``, every layout of that many ranks (tensor x pipeline x data, ZeRO
0-3, the config's recomputation mode unless ``--recompute all``) is planned; those whose largest rank fits are
ranked by a step-time estimate: the step's FLOPs with recomputation (``bench.formulas.flops_per_token``) at
``--device-tflops``, stretched by the pipeline bubble, plus the communication a ``bench comm`` fit
(``--comm-fit``) predicts for the tensor-parallel all-reduces, the data-parallel gradient reduction and the
pipeline sends.

With ``--link-gbps X``, each planned layout's data-parallel gradients (fp32, of its largest stage) are priced per
``parallel.grad_compression`` mode at X Gbit/s with the ``bench slow-link`` fit (``--slow-link-fit``: codec
seconds per gradient byte, bytes on the wire and their efficiency per mode), and the fastest mode is named
(``bench.slow_link_fit.choose_mode``).

After the table, one transformer block's activations per layout next to Megatron's accounting
(``bench.plan_layers``; with ``--check``, next to the per-layer bytes ``bench memory`` measured).

The modules: ``bench.plan_trace`` (the meta-device traces), ``bench.plan_layers`` (one block's),
``bench.plan_stages`` (each stage's planned memory), ``bench.plan_search`` (the layouts that fit),
``bench.formulas`` (model state, transients, FLOPs, a layer's activations), this one (the command, ``--check``).
"""


from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from bench.cli import fail
from bench.plan_search import check_search_args, search_text
from bench.plan_stages import plan_layout, plan_row

MIB = 2**20


def plan_table(rows: list[dict]) -> str:
    mb = lambda b: f"{b / MIB:,.0f}"  # noqa: E731
    checked = "measured_bytes" in rows[0]
    head = ((["run"] if checked else []) + ["layout", "ZeRO", "recompute", "largest stage", "params/rank",
            "model state MB", "activations MB", "steps MB", "optimizer MB", "planned peak MB"]
            + (["measured MB", "error"] if checked else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (([r["run"]] if checked else []) + [
            r["layout"], str(r["zero"]), r["recompute"], str(r["stage"]), f"{r['params'] / 1e6:.1f} M",
            mb(r["model_state_bytes"]), mb(r["activation_bytes"]), mb(r["steps_bytes"]), mb(r["optimizer_bytes"]),
            mb(r["peak_bytes"])] + ([mb(r["measured_bytes"]), f"{r['error']:+.1%}"] if checked else []))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def measured_peaks(results: Path) -> dict[str, int]:
    """Layout label -> the largest rank's peak above its runtime over the training phases (load, steps,
    optimizer) in a ``bench memory`` results.json."""
    out = {}
    for record in json.loads(results.read_text())["ranks"]:
        if record.get("status") != "ok":
            continue
        out[record["layout"]] = max(r[f"{phase}_peak_bytes"] - r["runtime_bytes"] for r in record["ranks"]
                                    for phase in ("load", "steps", "optimizer") if f"{phase}_peak_bytes" in r)
    return out


def measured_layers(results: Path) -> dict[str, int]:
    """Layout label -> the most bytes one transformer block kept on a rank (``bench memory``'s
    ``layer_bytes``; absent in results written before it measured them)."""
    return {record["layout"]: max(r.get("layer_bytes", 0) for r in record["ranks"])
            for record in json.loads(results.read_text())["ranks"] if record.get("status") == "ok"}


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '512MiB', '1e9' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    return int(float(lowered))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run config (YAML); with --check, each results file's own")
    parser.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    parser.add_argument("--layout", action="append", default=[], help="tensor=N,pipeline=N,data=N,context=N,zero=N "
                        "(repeatable; default: the config's own at one data-parallel rank)")
    parser.add_argument("--check", action="append", default=[], help="a `bench memory` results.json (repeatable): "
                        "plan its layouts with its own config and overrides and compare with the measured peaks")
    parser.add_argument("--device-memory", type=parse_bytes, help="memory per device, e.g. 80GiB: search the "
                        "layouts of --world-size ranks that fit")
    parser.add_argument("--world-size", type=int)
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step in the search (default: "
                        "micro_batch_size x grad_accum x world size)")
    parser.add_argument("--recompute", choices=("config", "all"), default="config",
                        help="search the config's recomputation mode or all three")
    parser.add_argument("--max-tensor", type=int, default=8, help="largest tensor-parallel degree searched "
                        "(one node's GPUs)")
    parser.add_argument("--device-tflops", type=float, default=989.0, help="dense TFLOP/s per device for the "
                        "compute estimate (H100 bf16: 989)")
    parser.add_argument("--comm-fit", default="bench/results/comm-cpu2-2026-11-24.json",
                        help="a `bench comm` results file: its latency/bandwidth fits price the communication")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the devices the run trains on: which attention kernel the activations follow "
                        "(default: this machine's)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--link-gbps", type=float, help="data-parallel link rate: say which "
                        "parallel.grad_compression mode the `bench slow-link` fit predicts fastest per layout")
    parser.add_argument("--slow-link-fit", default="bench/results/slow-link-cpu/results.json",
                        help="a `bench slow-link` results file (its per-mode fit)")
    parser.add_argument("--out", help="a directory for results.json (the rows) and report.md")
    args = parser.parse_args(argv)
    if not args.config and not args.check:
        parser.error("--config is required (or --check with bench memory results)")
    if (args.device_memory is None) != (args.world_size is None):
        parser.error("--device-memory and --world-size go together")
    check_search_args(args)
    if args.link_gbps is not None and args.link_gbps <= 0:
        fail("bench plan", f"--link-gbps {args.link_gbps}: must be positive")
    try:
        rows, text = search_text(args) if args.device_memory is not None else _plan_text(args)
        if args.link_gbps is not None:
            from bench.slow_link_fit import compression_advice

            text += "\n" + compression_advice(rows, args.link_gbps, args.slow_link_fit)
    except (ValueError, OSError, KeyError) as exc:  # a bad config, layout or file: one line, no traceback
        fail("bench plan", str(exc))
    print(text)
    if args.out:
        _write(Path(args.out), rows, text, argv)
    if args.check and any(abs(r["error"]) > 0.15 for r in rows):
        print("bench plan: some layouts are more than 15% off the measured peak", file=sys.stderr)
    return rows


def _plan_text(args) -> tuple[list[dict], str]:
    from bench.plan_layers import layer_table

    rows = plan_rows(args)
    return rows, plan_table(rows) + layer_table(rows)


def _write(out: Path, rows: list[dict], text: str, argv) -> None:
    from bench.machine import describe

    machine = describe()
    command = "python -m bench plan " + " ".join(argv if argv is not None else sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine, "command": command, "rows": rows}, indent=1))
    (out / "report.md").write_text(f"# Memory plan ({machine['date']}, {machine['cpu']}, torch {machine['torch']})"
                                   f"\n\n`{command}`\n\n{text}")


def plan_rows(args) -> list[dict]:
    """One row per layout: ``--layout`` (or the config's own) of ``--config``, or every layout of each
    ``--check`` results file, planned with that run's own config and overrides, next to its measured peak."""
    if not args.check:
        return [_planned_row(args.config, args.set, text, args.device) for text in args.layout or [""]]
    rows = []
    for results in map(Path, args.check):
        config, overrides = memory_run(results)
        layers = measured_layers(results)
        for text, measured in measured_peaks(results).items():
            row = _planned_row(config, overrides + args.set, text, args.device)
            row.update(run=results.parent.name, measured_bytes=measured, error=row["peak_bytes"] / measured - 1)
            if layers.get(text):
                row["measured_layer_bytes"] = layers[text]
            rows.append(row)
    return rows


def _planned_row(config: str, overrides: list[str], text: str, device: str) -> dict:
    from bench.plan_layers import layer_fields
    from bench.plan_trace import full_meta_model

    cfg, data = _variant_config(config, overrides, text)
    full = full_meta_model(cfg)
    row = plan_row(text or _describe(cfg), cfg, data, plan_layout(cfg, data, full=full, device=device))
    return {**row, **layer_fields(cfg, full, device)}


def _describe(cfg) -> str:
    par = cfg.parallel
    return f"tensor={par.tensor},pipeline={par.pipeline}" + (",sequence_parallel" if par.sequence_parallel else "")


def _variant_config(config: str, overrides: list[str], text: str):
    """(config of the ``--layout`` variant ``text``, its data-parallel degree); ``bench.variant.parse_variant``."""
    from bench.variant import parse_variant
    from training.config import load

    _, sets, nproc = parse_variant(text)
    cfg = load(config, overrides + sets)
    return cfg, nproc // (cfg.parallel.tensor * cfg.parallel.pipeline)


def memory_run(results: Path) -> tuple[str, list[str]]:
    """(config file, overrides) of the ``bench memory`` command that wrote ``results``."""
    command = shlex.split(json.loads(results.read_text())["command"])
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    known, _ = parser.parse_known_args(command[command.index("memory") + 1:])
    return known.config, known.set



if __name__ == "__main__":
    main()
