"""Which Hugging Face decoders does colonnade split, and do they train the same split as on one process?

    python -m bench coverage [--types llama,qwen2 | --kind moe] [--layouts tp2,pp2] [--out bench/results/coverage-cpu]

Every causal-LM model type of the installed transformers whose config declares ``base_model_tp_plan`` or is a
mixture of experts, plus colonnade's hand-planned decoders (gpt2), gets a tiny random checkpoint
(``bench.coverage_models``: 4 layers, hidden 64, 4 heads, 2 key-value heads, the byte-level tokenizer, 4 experts
top-2 in a mixture of experts, every other field at its default). Hybrids (state-space, linear-attention or
convolution mixers) are listed as refused without running. Every other type trains 3 steps (fp32, dropout off,
the same global batch of 4 sequences of 32 tokens: 2 per micro-batch x 2 micro-batches, 1 per micro-batch at 2
data-parallel ranks, ZeRO-1, AdamW with eps 1e-4: see docs/benchmarks.md) at the layouts of its kind (a dense
decoder: TP=2, TP=2 + sequence parallelism, PP=2 (1F1B), TP=2 x PP=2; a mixture of experts: EP=2 on 2
data-parallel ranks, EP=2 x TP=2 on 4) and once on one process, the reference. A layout's cell: ``equal`` (every
step's loss and gradient norm within 1e-5 relative of the reference's), ``refused: <the one-line reason colonnade
raised at its input checks>`` or ``failed: <the error, one line>`` (a traceback on any rank, a lost rank, or a
step that differs). The TP=2 x PP=2 run (EP=2 x TP=2 for a mixture of experts; the one-process run where that
layout does not train) writes colonnade's Hugging Face export, which is reloaded with
``AutoModelForCausalLM.from_pretrained`` and compared with the one-process model: no missing or unexpected
weights, the logits on a fixed batch within 1e-4 of the largest.

Ranks are forked from one server that imported the libraries once (``bench.coverage_ranks``). Each finished type
is appended to ``results.jsonl`` in ``--out``; a rerun with ``--types`` redoes those (and ``--layouts`` only those
cells), one without skips the types already there (``--redo``: all again); ``--kind`` keeps the types of one kind.
A type none of whose layouts is chosen is skipped. ``results.json`` and ``report.md``
(the table and the summary) are written from it at the end. The logs of the runs that failed are
kept in ``--out``/logs."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cli import RESULTS, fail

PROG = "bench coverage"
LAYOUTS = {"tp2": {"tensor": 2}, "tp2_sp": {"tensor": 2, "sequence_parallel": True}, "pp2": {"pipeline": 2},
           "tp2_pp2": {"tensor": 2, "pipeline": 2}, "ep2": {"expert": 2}, "ep2_tp2": {"expert": 2, "tensor": 2},
           "cp2": {"context": 2}}
LABELS = {"one_process": "one process", "tp2": "TP=2", "tp2_sp": "TP=2 + SP", "pp2": "PP=2 (1F1B)",
          "tp2_pp2": "TP=2 × PP=2", "ep2": "EP=2", "ep2_tp2": "EP=2 × TP=2", "cp2": "CP=2"}
# The kinds that train and their layouts; other kinds (hybrid, not built) are refused without running.
KIND_LAYOUTS = {"dense": ("tp2", "tp2_sp", "pp2", "tp2_pp2", "cp2"), "moe": ("ep2", "ep2_tp2")}
EXPORT_LAYOUTS = ("tp2_pp2", "ep2_tp2")  # the first one run writes the export
KINDS = ("dense", "moe", "hybrid")  # for --kind
STEPS, MICRO_BATCH, GRAD_ACCUM, SEED = 3, 2, 2, 7


def data_parallel(layout: dict[str, Any]) -> int:
    """The data-parallel degree of a layout: the expert- or context-parallel degree (both carved from DP), else 1."""
    return int(layout.get("expert", 1)) * int(layout.get("context", 1))


def replicas(layout: dict[str, Any]) -> int:
    """The data-parallel ranks that read different samples (a context group reads the same ones)."""
    return data_parallel(layout) // int(layout.get("context", 1))


def world_size(layout: dict[str, Any]) -> int:
    return int(layout.get("tensor", 1)) * int(layout.get("pipeline", 1)) * data_parallel(layout)


def layouts_of(kind: str, layouts: list[str]) -> list[str]:
    """The chosen ``layouts`` a type of ``kind`` trains at (every one for a kind that is refused without running)."""
    return [x for x in layouts if x in KIND_LAYOUTS[kind]] if kind in KIND_LAYOUTS else list(layouts)


def trained(record: dict[str, Any]) -> bool:
    """Whether ``record`` is of a kind that trains and ran (a cell at one of its kind's layouts or one process;
    earlier records of mixtures of experts have only the dense layouts' refusals)."""
    kind = record.get("kind")
    cells = record.get("cells", {})
    return kind in KIND_LAYOUTS and any(x in cells for x in ("one_process", *KIND_LAYOUTS[kind]))


def run_config(checkpoint: Path, work: Path, output_dir: Path, layout: dict[str, Any], export: bool) -> dict:
    """The run config (a dict for ``training.config.validate``) of one run of the tiny ``checkpoint``: the global
    batch the same at every layout (``MICRO_BATCH`` split over the data-parallel ranks)."""
    from bench.coverage_models import SEQ_LEN

    parallel = {"tensor": 1, "pipeline": 1, "sequence_parallel": False, "schedule": "1f1b", "zero_stage": 1,
                "timeout_s": 180.0, "p2p_timeout_s": 180.0, **layout}
    if MICRO_BATCH % replicas(layout):
        raise ValueError(f"{replicas(layout)} data-parallel ranks do not divide the micro-batch {MICRO_BATCH}")
    return {"model": {"pretrained": str(checkpoint)},
            "data": {"train_files": [str(work / "corpus" / "*.txt")], "seq_len": SEQ_LEN,
                     "cache_dir": str(work / "datasets")},
            "train": {"steps": STEPS, "micro_batch_size": MICRO_BATCH // replicas(layout),
                      "grad_accum": GRAD_ACCUM, "seed": SEED,
                      "output_dir": str(output_dir), "progress": False, "export_hf": export, "save_final": False},
            "optim": {"lr": 1e-3, "warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.1, "eps": 1e-4},
            "parallel": parallel, "logging": {"wandb": {"mode": "disabled"}}}


def write_corpus(directory: Path, files: int = 2, words: int = 1500, seed: int = 0) -> None:
    """A few files of pseudo-English (the tests' corpus): enough blocks for every step, no download."""
    import random

    rng = random.Random(seed)
    vocab = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "and", "then", "slept", "."]
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        (directory / f"part{index}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(words)))


def classify(model_type: str) -> dict[str, Any]:
    """The type's record before anything runs: whether its config declares a tensor-parallel plan, its kind
    (``dense``, ``moe``, ``hybrid``, ``not built``) and why it is not run."""
    from bench.coverage_models import declared_tp_plan, default_config, hybrid_reason, moe_reason, one_line_error

    record: dict[str, Any] = {"model_type": model_type, "kind": "dense", "reason": None}
    try:
        config = default_config(model_type)
    except Exception as exc:  # noqa: BLE001 - any library error is the one-line reason
        return {**record, "declares_tp_plan": False, "kind": "not built",
                "reason": f"default config: {one_line_error(exc)}"}
    record["declares_tp_plan"] = bool(declared_tp_plan(config))
    for kind, reason in (("moe", moe_reason(config)), ("hybrid", hybrid_reason(config))):
        if reason:
            return {**record, "kind": kind, "reason": reason}
    return record


def build(record: dict[str, Any], directory: Path) -> None:
    """The tiny checkpoint of a dense type or a mixture of experts in ``directory``; ``record`` says why not where
    it cannot be built or is not tiny, and its kind where a dense config's model turns out to hold experts
    (``moe``: trained at the expert-parallel layouts) or mixers."""
    from bench.coverage_models import (
        meta_model,
        module_reason,
        one_line_error,
        size_reason,
        tiny_config,
        write_checkpoint,
    )

    try:
        config = tiny_config(record["model_type"])
        model = meta_model(config)
    except Exception as exc:  # noqa: BLE001 - transformers' refusal of the tiny config is the reason
        record.update(kind="not built", reason=f"tiny config: {one_line_error(exc)}")
        return
    too_big = size_reason(model)
    if too_big:
        kind, reason = "not built", too_big
    elif record["kind"] == "moe":  # its config's expert count: colonnade says whether it finds the experts
        kind, reason = "moe", record["reason"]
    else:
        kind, reason = module_reason(model) or ("dense", None)
    record.update(kind=kind, reason=reason)
    if kind not in KIND_LAYOUTS:
        return
    try:
        record["parameters"] = write_checkpoint(config, directory, SEED)
    except Exception as exc:  # noqa: BLE001
        record.update(kind="not built", reason=f"tiny model: {one_line_error(exc)}")


def _run(job: dict, world: int, log: Path, timeout: float) -> tuple[str, list[dict] | None, dict]:
    """(verdict, step records, rank 0's result) of one launched run."""
    from bench.coverage_check import run_verdict
    from bench.coverage_ranks import launch, train

    shutil.rmtree(job["config"]["train"]["output_dir"], ignore_errors=True)
    started = time.monotonic()
    outcomes = launch(train, world, job, log, timeout)
    verdict, steps = run_verdict(outcomes)
    first = outcomes[0].value if outcomes[0].status == "ok" else {}
    return verdict, steps, {**first, "seconds": round(time.monotonic() - started, 1)}


def train_type(record: dict[str, Any], layouts: list[str], work: Path, logs: Path, timeout: float) -> None:
    """Every layout of a built type, then the one-process reference; the cells, steps and export check into
    ``record``."""
    from bench.coverage_check import check_export, compare_steps
    from bench.coverage_models import SEQ_LEN

    name, checkpoint = record["model_type"], work / "models" / record["model_type"]
    runs, cells, steps, seconds, exported = work / "runs" / name, {}, {}, {}, None
    exporter = next((x for x in EXPORT_LAYOUTS if x in layouts), None)
    for layout in layouts:
        degrees = LAYOUTS[layout]
        export = layout == exporter
        job = {"config": run_config(checkpoint, work, runs / layout, degrees, export)}
        cells[layout], steps[layout], result = _run(job, world_size(degrees), logs / f"{name}-{layout}.log",
                                                    timeout)
        seconds[layout] = result["seconds"]
        if export and steps[layout] is not None:
            exported = (layout, result.get("export_error"))
    reference_file = runs / "reference.pt"
    job = {"config": run_config(checkpoint, work, runs / "one_process", {}, exported is None),
           "reference_file": str(reference_file)}
    cells["one_process"], steps["one_process"], result = _run(job, 1, logs / f"{name}-one_process.log", timeout)
    seconds["one_process"] = result["seconds"]
    if exported is None and steps["one_process"] is not None:
        exported = ("one_process", result.get("export_error"))
    reference = steps["one_process"]
    for layout in layouts:
        if steps[layout] is not None:
            cells[layout] = compare_steps(steps[layout], reference) if reference is not None else \
                f"failed: trained, but the one-process reference did not ({cells['one_process']})"
    if reference is not None:
        cells["one_process"] = "trains"
    record.update(cells=cells, steps={k: v for k, v in steps.items() if v is not None}, run_seconds=seconds)
    if exported is not None and reference is not None:
        source, error = exported
        record["export"] = {"from": source, **({"status": f"failed: {error}"} if error else
                                               _checked(check_export, runs / source / "hf", reference_file, SEQ_LEN))}


def _checked(check: Any, *args: Any) -> dict[str, Any]:
    from bench.coverage_models import one_line_error

    try:
        return check(*args)
    except Exception as exc:  # noqa: BLE001 - the reload's own error is the verdict
        return {"status": f"failed: {one_line_error(exc)}"}


def cover(model_type: str, layouts: list[str], work: Path, logs: Path, timeout: float) -> dict[str, Any]:
    """One type's record: classified, built, trained at those of ``layouts`` that are of its kind and on one
    process, compared, exported; a kind that does not train refused at every layout. A type that turns out at
    its build to be of a kind none of ``layouts`` is of gets no cells."""
    import transformers

    started = time.monotonic()
    record = classify(model_type)
    if record["kind"] in KIND_LAYOUTS:
        build(record, work / "models" / model_type)
    mine = layouts_of(record["kind"], layouts)
    if record["kind"] in KIND_LAYOUTS:
        record["cells"] = {}
        if mine:
            train_type(record, mine, work, logs, timeout)
    else:
        record["cells"] = {layout: f"refused: {record['reason']}" for layout in layouts}
    record.update(seconds=round(time.monotonic() - started, 1), transformers=transformers.__version__)
    return record


def _keep_logs(record: dict[str, Any], logs: Path, out: Path) -> None:
    """The logs of the cells that failed, into ``out``/logs (replacing an earlier run's; an earlier log of a cell
    that no longer fails is removed); the rest deleted."""
    for layout, cell in record.get("cells", {}).items():
        log, kept = logs / f"{record['model_type']}-{layout}.log", out / "logs" / f"{record['model_type']}-{layout}.log"
        if log.is_file() and cell.startswith("failed"):
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, kept)
        else:
            kept.unlink(missing_ok=True)
        log.unlink(missing_ok=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench coverage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", help="comma-separated model types (default: every causal LM whose config "
                        "declares base_model_tp_plan or is a mixture of experts, and colonnade's hand-planned ones)")
    parser.add_argument("--kind", help=f"only the types of this kind, of {', '.join(KINDS)} (as classified from "
                        "their default config)")
    parser.add_argument("--layouts", help=f"comma-separated, of {', '.join(LAYOUTS)} (default: all; each type "
                        f"trains at those of its kind: {_kinds_help()})")
    parser.add_argument("--out", default=str(RESULTS / "coverage-cpu"), help="where results.jsonl, results.json "
                        "and report.md go (default: this repository's bench/results/coverage-cpu)")
    parser.add_argument("--redo", action="store_true", help="without --types: run the types already in "
                        "results.jsonl again too")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for one run (default 300)")
    parser.add_argument("--work", help="keep the tiny checkpoints and runs here (default: a temporary directory, "
                        "deleted at the end)")
    return parser.parse_args(argv)


def _kinds_help() -> str:
    return "; ".join(f"{kind}: {', '.join(layouts)}" for kind, layouts in KIND_LAYOUTS.items())


def chosen(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(types, layouts) the arguments name; a bad name is one line and exit code 2."""
    from bench.coverage_models import causal_lm_types, enumerate_types

    layouts = [x for x in (args.layouts or ",".join(LAYOUTS)).split(",") if x]
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown or not layouts:
        fail(PROG, f"--layouts {args.layouts!r}: choose from {', '.join(LAYOUTS)}")
    if args.kind is not None and args.kind not in KINDS:
        fail(PROG, f"--kind {args.kind!r}: choose from {', '.join(KINDS)}")
    if not args.types:
        return enumerate_types()[0], layouts
    types = [x for x in args.types.split(",") if x]
    known = set(causal_lm_types())
    unknown = [x for x in types if x not in known]
    if unknown or not types:
        import difflib

        near = difflib.get_close_matches(unknown[0], sorted(known), n=1) if unknown else []
        fail(PROG, f"--types: {unknown[0] if unknown else '(none)'} is not a causal-LM model type of transformers"
                   + (f"; did you mean {near[0]}?" if near else ""))
    return types, layouts


def main(argv: list[str] | None = None) -> None:
    from bench.coverage_report import load_records, write_outputs

    args = parse_args(argv)
    types, layouts = chosen(args)
    _quiet_transformers()
    out = Path(args.out)
    done = load_records(out / "results.jsonl") if not args.types and not args.redo else {}
    types = to_cover(types, layouts, args.kind, done)
    print(f"{PROG}: {len(types)} model types at {', '.join(layouts)}; outputs in {out.resolve()}", file=sys.stderr)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="coverage-"))
    try:
        _cover_all(types, layouts, work, out, args.timeout)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(write_outputs(out))


def to_cover(types: list[str], layouts: list[str], kind: str | None, done: dict[str, dict]) -> list[str]:
    """Of ``types``: those of ``kind`` (any where None), less those of a kind that trains at none of ``layouts``
    and those whose record in ``done`` has a cell at each of the ``layouts`` of its kind."""
    keep = []
    for model_type in types:
        classified = classify(model_type)["kind"]
        if kind is not None and classified != kind or not layouts_of(classified, layouts):
            continue
        old = done.get(model_type)
        if old is not None and set(layouts_of(old["kind"], layouts)) <= set(old.get("cells", {})):
            continue
        keep.append(model_type)
    return keep


def _quiet_transformers() -> None:
    """No progress bars or advice from transformers in the parent (saving and reloading the tiny models)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


def _cover_all(types: list[str], layouts: list[str], work: Path, out: Path, timeout: float) -> None:
    from bench.coverage_models import modeling_module
    from bench.coverage_ranks import start_server
    from bench.coverage_report import save_record

    write_corpus(work / "corpus")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    trained = [t for t in types if classify(t)["kind"] in KIND_LAYOUTS]
    start_server([m for m in map(modeling_module, trained) if m])
    for index, model_type in enumerate(types, 1):
        record = cover(model_type, layouts, work, logs, timeout)
        _keep_logs(record, logs, out)
        save_record(out / "results.jsonl", record)
        print(f"[{index}/{len(types)}] {progress_line(record)}", flush=True)


def progress_line(record: dict[str, Any]) -> str:
    """One type's outcome on one line."""
    head = f"{record['model_type']} ({record['seconds']:.0f} s): "
    if not trained(record):
        return head + f"not run ({record['kind']}): {record['reason']}"
    cells = ", ".join(f"{LABELS[k]}: {v}" for k, v in record["cells"].items())
    export = record.get("export")
    return head + cells + (f"; export from {LABELS[export['from']]}: {export['status']}" if export else "")


if __name__ == "__main__":
    main()
