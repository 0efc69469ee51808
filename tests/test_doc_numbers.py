"""Numbers quoted in README.md and docs/benchmarks.md equal the committed results under bench/results/ they come
from. Each claim is the exact text the document must contain, written from its results file; a changed number
on either side fails the check. Before: docs/benchmarks.md said the Llama-7B plan search fits "47 of its 63
layouts"; the command prints 61 of 81 (the committed results were as stale as the text)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PLAN_COMMAND = ("python -m bench plan --config configs/plan_llama7b.yaml --device cuda --device-memory 40GiB "
                "--world-size 8 --recompute all")


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _plan_claims(plan: dict) -> list[str]:
    rows = plan["rows"]
    gib = {(r["layout"], r["zero"], r["recompute"]): f"{r['peak_bytes'] / 2**30:.1f}" for r in rows}

    def row(t: int, p: int, d: int, extra: dict | None = None) -> str:
        layout = f"tensor={t},pipeline={p},data={d}"
        micro = next(r["micro_batches"] for r in rows if r["layout"] == layout)
        cells = [gib[(layout, 1, mode)] + (f" ({extra[mode]})" if extra and mode in extra else "")
                 for mode in ("none", "selective", "full")]
        return f"| {t} × {p} × {d} | {micro} | " + " | ".join(cells) + " |"

    one_one_eight = "tensor=1,pipeline=1,data=8"
    return [f"{sum(r['fits'] for r in rows)} of its {len(rows)} layouts fit",
            row(1, 1, 8, {"none": f"ZeRO-2: {gib[(one_one_eight, 2, 'none')]}, "
                                  f"ZeRO-3: {gib[(one_one_eight, 3, 'none')]}",
                          "full": f"ZeRO-3: {gib[(one_one_eight, 3, 'full')]}"}),
            row(1, 2, 4), row(1, 8, 1), row(2, 2, 2), row(8, 1, 1)]


def _llama_demo_rows(demo: dict) -> list[str]:
    """The README's memory table: MB above the runtime (× the model state: the formula less the activations)."""
    names = {"tensor=2,pipeline=2": "TP=2 × PP=2", "tensor=4": "resumed at TP=4"}
    lines = []
    for row in demo["rows"]:
        state = row["formula_bytes"] - row["activation_bytes"]
        cells = [f"{row[f'{phase}_above_runtime_bytes'] / 2**20:,.0f} "
                 f"({row[f'{phase}_above_runtime_bytes'] / state:.2f})" if f"{phase}_above_runtime_bytes" in row
                 else "–" for phase in ("load", "resume", "steps", "optimizer", "save", "export")]
        lines.append(f"| {names[row['layout']]} | " + " | ".join(cells) + " |")
    return lines


def _moe_memory_rows(memory: dict) -> list[str]:
    """docs/benchmarks.md's expert-parallel memory table: MB above the runtime (× the formula, worst rank)."""
    names = {"data=2,zero=2": "DP=2, ZeRO-2", "data=2,zero=2,expert=2": "DP=2 = EP=2, ZeRO-2",
             "data=2,zero=1,expert=2": "DP=2 = EP=2, ZeRO-1"}
    return [f"| {names[row['layout']]} | {row['params_per_rank'] / 1e6:.1f} M | {row['formula_bytes'] / 2**20:,.0f} | "
            + " | ".join(f"{row[f'{phase}_above_runtime_bytes'] / 2**20:,.0f} ({row[f'{phase}_vs_formula']:.2f})"
                         for phase in ("load", "steps", "optimizer", "save", "export")) + " |"
            for row in memory["rows"]]


def _moe_memory_claim(memory: dict) -> str:
    """The README's sentence on the EP=2 run (ZeRO-2) against plain data parallelism."""
    plain, split = memory["rows"][0], memory["rows"][1]
    worst = max(split[f"{phase}_vs_formula"] for phase in ("load", "steps", "optimizer", "save", "export"))
    return (f"holds {split['params_per_rank'] / 1e6:.0f} M parameters per rank instead of "
            f"{plain['params_per_rank'] / 1e6:.0f} M, its peak within {worst:.2f}× the formula")


def _generate_rows(result: dict) -> list[str]:
    """The README's generation table: one row per layout (the largest rank's cache / the one-process cache)."""
    rows = []
    for layout in result["layouts"]:
        cache = max(r["cache_vs_one_process"] for r in layout["ranks"])
        rows.append(f"| {layout['layout']} | {layout['world']} | {layout['batches']} | {layout['ttft_s']:.2f} | "
                    f"{layout['tpot_s'] * 1000:.1f} | {layout['tokens_per_s']:.1f} | {layout['equal_to_hf']} | "
                    f"{cache:.4f} |")
    return rows


def _pipelining_claim(result: dict) -> str:
    pipelined = result["pipelining"]["pipelined"]
    return (f"{pipelined['tokens_per_s_batches_2']:.1f} tokens/s with 2 batches in flight against "
            f"{pipelined['tokens_per_s_batches_1']:.1f} with 1, **{pipelined['ratio']:.2f}×**")


def claims() -> dict[str, list[str]]:
    """Document -> the texts it must contain, each computed from a committed results file."""
    save, adam = _load("async-save-cpu/results.json"), _load("cpu-adam-cpu/results.json")
    overhead = _load("overhead-cpu2-2026-11-23.json")
    step = {r["optimizer"]: r["step_s"] for r in adam["rows"]}
    fused, foreach, ds = step["torch AdamW (fused)"], step["torch AdamW (foreach)"], step["DeepSpeedCPUAdam"]
    return {
        "README.md": [
            f"a save holds the step loop {save['median_checkpoint_s']['async']:.2f} s instead of "
            f"{save['median_checkpoint_s']['sync']:.2f} s",
            f"cost per save {save['async_over_sync']:.2f}× the synchronous one (2-core CPU, GPT-2 "
            f"{save['params'] / 1e6:.1f} M)",
            f"steps {adam['params'] / 1e6:.0f} M fp32 parameters in {fused:.3f} s fused, {ds:.3f} s with "
            f"`DeepSpeedCPUAdam` ({ds / fused:.2f}× slower) and {foreach:.3f} s with torch's foreach AdamW "
            f"({foreach / fused:.1f}×)",
            *_llama_demo_rows(_load("llama-demo-cpu/summary.json")),
            _moe_memory_claim(_load("memory-moe-cpu/results.json")),
            *_generate_rows(_load("generate-cpu/result.json")),
            _pipelining_claim(_load("generate-cpu/result.json")),
            _pipelining_claim(_load("generate-cpu/requests128/result.json"))],
        "docs/benchmarks.md": [
            f"| {overhead['plain_tokens_per_s']:,.0f} tok/s | {overhead['colonnade_tokens_per_s']:,.0f} tok/s | "
            f"**{overhead['throughput_ratio']:.2f}** |",
            *_plan_claims(_load("plan-search-llama7b/results.json")),
            *_moe_memory_rows(_load("memory-moe-cpu/results.json"))],
    }


def stale(text: str, expected: list[str]) -> list[str]:
    """The expected texts that ``text`` does not contain (line breaks and runs of spaces count as one space)."""
    flat = " ".join(text.split())
    return [claim for claim in expected if " ".join(claim.split()) not in flat]


def test_quoted_numbers_equal_the_committed_results():
    for doc, expected in claims().items():
        assert not stale((ROOT / doc).read_text(), expected), (doc, stale((ROOT / doc).read_text(), expected))


def test_a_changed_number_is_caught():
    """Each claim's first number changed by one in a copy of its document: the check names that claim."""
    for doc, expected in claims().items():
        text = " ".join((ROOT / doc).read_text().split())  # a claim may span a line break
        for claim in expected:
            changed = re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), claim, count=1)
            assert stale(text.replace(claim, changed), expected) == [claim], (doc, claim)
    text = (ROOT / "docs/benchmarks.md").read_text()
    assert "77 of its 81 layouts fit" in stale(text.replace("77 of its 81", "61 of its 81"), _plan_claims(
        _load("plan-search-llama7b/results.json")))


def test_the_plan_search_results_are_this_codes():
    """The committed search was written by the documented command, and today's code still plans the same
    layouts (the candidates are found in seconds; the fit of each needs the 50 s trace, so it is read from the
    file). Before: the committed file listed 63 layouts, the code 81."""
    import argparse

    from bench.plan_search import candidates

    plan = _load("plan-search-llama7b/results.json")
    assert plan["command"].startswith(PLAN_COMMAND)
    assert PLAN_COMMAND in " ".join((ROOT / "docs/benchmarks.md").read_text().replace("`", " ").split())
    args = argparse.Namespace(config=str(ROOT / "configs/plan_llama7b.yaml"), set=[], recompute="all", max_tensor=8)
    planned = sorted((label, cfg.parallel.zero_stage, cfg.parallel.activation_checkpointing)
                     for label, cfg, _ in candidates(args, 8, 64))
    assert planned == sorted((r["layout"], r["zero"], r["recompute"]) for r in plan["rows"])
