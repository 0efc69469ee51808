"""bench coverage: which types it enumerates, the tiny configs it builds, how it classifies (dense, mixture of
experts, hybrid), the verdict of a run from its ranks' outcomes, the results file's merging, bad input as one
line; and the real command on Llama (equal at TP=2 and TP=2 x PP=2, the export reloaded equal), OPT (refused
with colonnade's reason) and Mixtral (not run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.coverage_check import compare_steps, run_verdict
from bench.coverage_models import (
    SEQ_LEN,
    SMALL,
    enumerate_types,
    hybrid_reason,
    meta_model,
    module_reason,
    moe_reason,
    tiny_config,
)
from bench.coverage_ranks import Outcome

ROOT = Path(__file__).resolve().parents[1]
STEPS = [{"step": s, "loss": 5.0 - s / 10, "grad_norm": 3.0 + s} for s in (1, 2, 3)]


@pytest.mark.unit
def test_enumeration_takes_declared_plans_and_colonnades_own():
    types, _ = enumerate_types()
    for declared in ("llama", "qwen3", "gemma3_text", "mistral", "mixtral", "qwen3_5_text"):
        assert declared in types
    assert "gpt2" in types  # no base_model_tp_plan in its config: colonnade's own plan
    assert "opt" not in types and "bloom" not in types  # causal LMs that declare no plan
    assert len(types) == len(set(types))


@pytest.mark.unit
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text", "gpt2"])
def test_tiny_config_sizes(model_type):
    from bench.diverge import dropout_fields

    config = tiny_config(model_type)
    assert config.num_hidden_layers == 4 and config.hidden_size == 64 and config.num_attention_heads == 4
    assert config.vocab_size == SMALL["vocab_size"] and config.eos_token_id == 257
    assert not any(dropout_fields(config).values())
    if model_type != "gpt2":
        assert config.num_key_value_heads == 2 and config.head_dim == 16 and config.intermediate_size == 128
    model = meta_model(config)
    assert sum(p.numel() for p in model.parameters()) < 400_000
    assert module_reason(model) is None


@pytest.mark.unit
def test_tiny_config_keeps_both_attention_kinds_within_the_sequence():
    """Gemma 3's default pattern (5 sliding, 1 full) cut to 4 layers would have no full layer: the last takes it;
    the window is under the sequence, so the sliding mask is not the causal one."""
    config = tiny_config("gemma3_text")
    assert config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    assert config.sliding_window < SEQ_LEN
    gemma4 = tiny_config("gemma4_text")  # per-layer overrides: the full layers' wider heads scaled down with them
    assert sum(p.numel() for p in meta_model(gemma4).parameters()) < 400_000


@pytest.mark.unit
def test_classification():
    from bench.coverage import classify

    assert classify("llama")["kind"] == classify("qwen3")["kind"] == classify("gemma3_text")["kind"] == "dense"
    mixtral = classify("mixtral")
    assert mixtral["kind"] == "moe" and "num_local_experts=8" in mixtral["reason"]
    assert classify("qwen3_5_text") == {"model_type": "qwen3_5_text", "kind": "hybrid", "declares_tp_plan": True,
                                        "reason": "hybrid (layer_types has linear_attention)"}
    assert "mamba_" in classify("falcon_h1")["reason"]
    assert classify("doge")["kind"] == "dense"  # num_experts=16384 with is_moe=False: its blocks are dense
    assert classify("gemma4_text")["kind"] == "dense"  # enable_moe_block=False
    assert moe_reason(tiny_config("llama")) is None and hybrid_reason(tiny_config("llama")) is None
    assert module_reason(meta_model(tiny_config("mixtral")))[0] == "moe"  # the built model agrees


@pytest.mark.unit
def test_run_verdicts():
    ok = Outcome("ok", {"status": "ok", "steps": STEPS})
    traceback = "Traceback (most recent call last):\n  File ...\nRuntimeError: shapes do not match\n"
    assert run_verdict([ok, Outcome("error", traceback)]) == ("failed: rank 1: RuntimeError: shapes do not match",
                                                              None)
    assert run_verdict([Outcome("refused", "parallel.tensor=2: no plan"), Outcome("lost", "killed")]) == \
        ("refused: parallel.tensor=2: no plan", None)
    assert run_verdict([ok, Outcome("lost", "killed after 300s")])[0] == "failed: rank 1 lost (killed after 300s)"
    assert run_verdict([ok, ok]) == ("ok", STEPS)
    assert compare_steps([dict(s) for s in STEPS], STEPS) == "equal"
    near = [dict(s, loss=s["loss"] * (1 + 5e-6)) for s in STEPS]
    assert compare_steps(near, STEPS) == "equal"
    off = [dict(s) for s in STEPS]
    off[1]["grad_norm"] *= 1 + 1e-4
    assert compare_steps(off, STEPS).startswith("failed: differs from one process at step 2: grad_norm")


@pytest.mark.unit
def test_results_merge_cell_by_cell(tmp_path):
    """A rerun of some layouts of a type keeps the others' cells; a type rerun as another kind is replaced."""
    from bench.coverage_report import load_records, markdown, save_record, summary

    path = tmp_path / "results.jsonl"
    cells = {"tp2": "equal", "tp2_sp": "equal", "pp2": "failed: x", "tp2_pp2": "equal", "one_process": "trains"}
    save_record(path, {"model_type": "llama", "kind": "dense", "declares_tp_plan": True, "cells": cells,
                       "steps": {}, "export": {"from": "tp2_pp2", "status": "equal"}})
    save_record(path, {"model_type": "llama", "kind": "dense", "declares_tp_plan": True, "cells": {"pp2": "equal"},
                       "steps": {}})
    save_record(path, {"model_type": "mixtral", "kind": "moe", "reason": "mixture of experts (x|y)", "cells": {}})
    records = load_records(path)
    assert records["llama"]["cells"] == {**cells, "pp2": "equal"} and records["llama"]["export"]["status"] == "equal"
    counts = summary(records)
    assert counts["equal_at_all_four"] == ["llama"] and counts["not_run"] == {"moe": ["mixtral"]}
    assert "| mixtral | moe | refused: mixture of experts (x\\|y) |" in markdown(records, {}, counts)


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["--types", "lama"], "--types: lama is not a causal-LM model type of transformers; did you mean llama?"),
    (["--types", "llama", "--layouts", "tp4"], "--layouts 'tp4': choose from tp2, tp2_sp, pp2, tp2_pp2")])
def test_bad_input_is_one_line(argv, message, capsys):
    from bench.coverage import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == f"bench coverage: {message}"


@pytest.mark.unit
def test_the_documented_summary_is_the_committed_one():
    """docs/benchmarks.md quotes the summary of bench/results/coverage-cpu as the command wrote it."""
    from bench.coverage_report import summary_text

    committed = json.loads((ROOT / "bench/results/coverage-cpu/results.json").read_text())
    doc = " ".join((ROOT / "docs/benchmarks.md").read_text().split())
    for line in summary_text(committed["summary"]).splitlines():
        assert " ".join(line.split()) in doc, line


@pytest.mark.subprocess
@pytest.mark.slow
def test_the_command_on_llama_opt_and_mixtral(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench", "coverage", "--types", "llama,opt,mixtral",
                           "--layouts", "tp2,tp2_pp2", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["model_type"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    llama, opt, mixtral = records["llama"], records["opt"], records["mixtral"]
    assert llama["cells"] == {"tp2": "equal", "tp2_pp2": "equal", "one_process": "trains"}
    assert llama["export"]["from"] == "tp2_pp2" and llama["export"]["status"] == "equal"
    assert llama["steps"]["tp2_pp2"][2]["loss"] == pytest.approx(llama["steps"]["one_process"][2]["loss"], rel=1e-5)
    assert opt["cells"]["tp2"].startswith("refused: parallel.tensor=2:") and "'opt'" in opt["cells"]["tp2"]
    assert opt["cells"]["one_process"] == "trains" and opt["export"]["from"] == "one_process"
    assert mixtral["kind"] == "moe" and "steps" not in mixtral
    assert (out / "report.md").is_file() and json.loads((out / "results.json").read_text())["summary"]
    assert "llama (" in proc.stdout and "mixtral (0 s): not run (moe)" in proc.stdout
