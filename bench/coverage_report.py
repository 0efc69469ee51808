"""``bench coverage``'s files: ``results.jsonl`` (a record per model type, appended as each finishes; a later
record of a type replaces the earlier one, cell by cell for a type that trained both times as the same kind),
``results.json`` and ``report.md`` (the model type x layout tables, dense decoders and mixtures of experts, and
the summary)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.coverage import KIND_LAYOUTS, LABELS, trained

DENSE, MOE = KIND_LAYOUTS["dense"], KIND_LAYOUTS["moe"]
FOUR = ("tp2", "tp2_sp", "pp2", "tp2_pp2")  # "equal at all four layouts": tensor and pipeline (CP=2 counted apart)


def save_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _merged(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``old``: a trained type's cells and steps layout by layout (a rerun of some layouts keeps the
    others'), its export check where the rerun made none; any other record whole."""
    if old is None or not trained(old) or not trained(new) or old["kind"] != new["kind"]:
        return new
    merged = {**old, **new, "cells": {**old.get("cells", {}), **new.get("cells", {})},
              "steps": {**old.get("steps", {}), **new.get("steps", {})}}
    if "export" not in new and "export" in old:
        merged["export"] = old["export"]
    return merged


def load_records(path: Path) -> dict[str, dict[str, Any]]:
    """model type -> its record, the lines of ``path`` merged in order; {} where there is no file."""
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["model_type"]] = _merged(records.get(record["model_type"]), record)
    return records


def _equal_everywhere(record: dict[str, Any], layouts: tuple[str, ...] = FOUR) -> bool:
    cells = record.get("cells", {})
    return all(cells.get(layout) == "equal" for layout in layouts)


def _per_layout(records: list[dict[str, Any]], layouts: tuple[str, ...]) -> dict[str, dict[str, int]]:
    return {layout: {status: sum(1 for r in records if r.get("cells", {}).get(layout, "").startswith(status))
                     for status in ("equal", "refused", "failed")} for layout in layouts}


def summary(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts: the dense decoders that declare a plan and those equal at all four layouts; colonnade's
    hand-planned ones; each dense layout's equal / refused / failed; where mixtures of experts ran, their number,
    those equal at both expert-parallel layouts and each of those layouts' counts; the types not run by kind; the
    export checks."""
    ran = [r for r in records.values() if trained(r)]
    dense, moe = [r for r in ran if r["kind"] == "dense"], [r for r in ran if r["kind"] == "moe"]
    declared = [r for r in dense if r.get("declares_tp_plan")]
    kinds: dict[str, list[str]] = {}
    for record in records.values():
        if not trained(record):
            kinds.setdefault(record["kind"], []).append(record["model_type"])
    exports = [r["export"]["status"] for r in ran if "export" in r]
    counts = {"dense_declaring_plan": len(declared),
              "equal_at_all_four": sorted(r["model_type"] for r in declared if _equal_everywhere(r)),
              "hand_planned": {r["model_type"]: _equal_everywhere(r) for r in dense if not r.get("declares_tp_plan")},
              "per_layout": _per_layout(dense, DENSE), "not_run": {k: sorted(v) for k, v in kinds.items()},
              "export_checked": len(exports), "export_equal": sum(1 for s in exports if s == "equal")}
    if moe:
        counts.update(moe_run=len(moe), moe_equal_at_both=sorted(r["model_type"] for r in moe
                                                                 if _equal_everywhere(r, MOE)),
                      moe_per_layout=_per_layout(moe, MOE))
    return counts


def _layout_lines(per_layout: dict[str, dict[str, int]]) -> list[str]:
    return [f"{LABELS[layout]}: " + ", ".join(f"{n} {status}" for status, n in by.items())
            for layout, by in per_layout.items()]


def summary_text(counts: dict[str, Any]) -> str:
    """The summary's lines: the dense decoders' (left out where none ran but mixtures of experts did), the
    mixtures of experts' (where any ran), the types not run, the export checks."""
    lines = []
    if counts["dense_declaring_plan"] or counts["hand_planned"] or not counts.get("moe_run"):
        equal = counts["equal_at_all_four"]
        lines.append(f"dense attention + MLP decoders declaring base_model_tp_plan: {counts['dense_declaring_plan']}"
                     f"; equal at all four layouts: {len(equal)}" + (f" ({', '.join(equal)})" if equal else ""))
        for name, ok in counts["hand_planned"].items():
            verdict = "equal at all four layouts" if ok else "not equal at all four layouts"
            lines.append(f"colonnade's hand-planned {name}: {verdict}")
        lines += _layout_lines(counts["per_layout"])
    if counts.get("moe_run"):
        equal = counts["moe_equal_at_both"]
        lines.append(f"mixtures of experts run at expert parallelism: {counts['moe_run']}; equal at both layouts: "
                     f"{len(equal)}" + (f" ({', '.join(equal)})" if equal else ""))
        lines += _layout_lines(counts["moe_per_layout"])
    lines.append("not run: " + ("; ".join(f"{len(v)} {k}" for k, v in counts["not_run"].items()) or "none"))
    lines.append(f"Hugging Face export reloaded equal: {counts['export_equal']} of {counts['export_checked']}")
    return "\n".join(lines)


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def _table(records: dict[str, dict[str, Any]], kind: str) -> list[str]:
    """The table of the types of ``kind`` that ran: one process, each of the kind's layouts, the export, seconds."""
    columns = ["one_process", *KIND_LAYOUTS[kind]]
    lines = ["| model type | " + " | ".join(LABELS[c] for c in columns) + " | export | s |",
             "|---|" + "---|" * (len(columns) + 2)]
    for name, record in sorted(records.items()):
        if trained(record) and record["kind"] == kind:
            export = record.get("export")
            where = f"{_cell(export['status'])} (from {LABELS[export['from']]})" if export else ""
            cells = [_cell(record.get("cells", {}).get(c, "not run")) for c in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {where} | {record.get('seconds', '')} |")
    return lines


def markdown(records: dict[str, dict[str, Any]], machine: dict[str, Any], counts: dict[str, Any]) -> str:
    """The report: the summary, the dense types' table (one process and each layout; left out where none ran but
    mixtures of experts did), the mixtures of experts' table (where any ran), the types not run."""
    versions = sorted({r.get("transformers", "?") for r in records.values()})
    lines = [f"# bench coverage ({machine.get('date')}, {machine.get('cores')} cores {machine.get('cpu')}, "
             f"torch {machine.get('torch')}, transformers {', '.join(versions)}, colonnade "
             f"{machine.get('colonnade') or 'outside git'})", "", summary_text(counts)]
    if counts["dense_declaring_plan"] or counts["hand_planned"] or not counts.get("moe_run"):
        lines += ["", *_table(records, "dense")]
    if counts.get("moe_run"):
        lines += ["", "Mixtures of experts (4 routed experts, top-2 or fewer; EP=2 on 2 data-parallel ranks):", "",
                  *_table(records, "moe")]
    lines += ["", "Not run (every layout refused without running):", "", "| model type | kind | reason |",
              "|---|---|---|"]
    lines += [f"| {name} | {r['kind']} | refused: {_cell(r['reason'])} |" for name, r in sorted(records.items())
              if not trained(r)]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path) -> str:
    """results.jsonl compacted, results.json and report.md from it; the summary text."""
    from bench.machine import describe

    records = load_records(out / "results.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    machine, counts = {**describe(), "colonnade": colonnade_commit()}, summary(records)
    (out / "results.json").write_text(json.dumps({"machine": machine, "summary": counts,
                                                  "records": list(records.values())}, indent=1))
    (out / "report.md").write_text(markdown(records, machine, counts))
    return summary_text(counts)


def colonnade_commit() -> str | None:
    """The commit of the colonnade checkout that ran (``+modified`` where parallel/, modeling/ or training/ differ
    from it); None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "parallel", "modeling",
                                "training"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+modified" if dirty else "")
