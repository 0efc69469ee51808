"""bench coverage: which types it enumerates, the tiny configs it builds (a mixture of experts' 4 experts), how it
classifies (dense, mixture of experts, hybrid), which layouts each kind trains at and the run configs of the
expert-parallel ones, the verdict of a run from its ranks' outcomes, the results file's merging and summary, bad
input as one line; and the real command on Llama (equal at TP=2 and TP=2 x PP=2, the export reloaded equal), OPT
(refused with colonnade's reason) and Mixtral (equal at EP=2)."""

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
    assert "zaya" in types  # a mixture of experts without a declared plan: expert parallelism needs none
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
@pytest.mark.parametrize("model_type, experts, top_k", [
    ("mixtral", "num_local_experts", "num_experts_per_tok"), ("qwen3_moe", "num_local_experts", "num_experts_per_tok"),
    ("deepseek_v3", "n_routed_experts", "num_experts_per_tok"), ("bailing_hybrid", "num_experts",
                                                                 "num_experts_per_token"),
    ("aria_text", "moe_num_experts", "moe_topk"), ("hunyuan_v1_moe", "num_experts", "moe_topk"),
    ("phimoe", "num_local_experts", "num_experts_per_tok"), ("deepseek_v2", "n_routed_experts",
                                                             "num_experts_per_tok"),
    ("jamba", "num_experts", "num_experts_per_tok")])
def test_tiny_moe_config_has_4_experts(model_type, experts, top_k):
    """4 routed experts (hunyuan_v1_moe's default 1 raised), top-2 at most (its 1 kept, DeepSeek-V2's unset one
    set), 2 expert groups of which 1 is chosen (DeepSeek-V3's 8 of 4 would leave no expert in a group), router
    noise off (phimoe's jitter), no load-balancing loss; the built model's experts modules hold the 4, the model
    is tiny."""
    config = tiny_config(model_type)
    fields = config.to_dict()
    assert fields[experts] == 4 and 1 <= fields[top_k] <= 2
    assert not fields.get("output_router_logits") and not fields.get("router_jitter_noise")
    for group in ("n_group", "num_expert_group"):
        assert fields.get(group) in (None, 1, 2)
    if fields.get("n_group") == 2:
        assert fields["topk_group"] == 1
    model = meta_model(config)
    counts = {m.num_experts for m in model.modules() if hasattr(m, "_is_expert_parallel")}
    assert counts == {4}
    assert sum(p.numel() for p in model.parameters()) < 1_500_000
    assert tiny_config("doge").num_experts == 4  # a dense config's expert field: lowered only, as before
    if model_type == "jamba":  # its layer kinds follow from periods: the attention one in 8 kept in the 4 layers
        assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"]


@pytest.mark.unit
def test_layouts_of_each_kind_and_their_run_configs(tmp_path):
    """A dense decoder trains at the four dense layouts, a mixture of experts at EP=2 (2 ranks) and EP=2 x TP=2
    (4), other kinds are refused at every chosen one; the expert-parallel runs keep the global batch of 4 (1
    sequence per micro-batch on each of the 2 data-parallel ranks) and ZeRO-1, and validate."""
    from bench.coverage import LAYOUTS, layouts_of, run_config, trained, world_size, write_corpus
    from training.config import validate

    everything = list(LAYOUTS)
    assert layouts_of("dense", everything) == ["tp2", "tp2_sp", "pp2", "tp2_pp2", "cp2"]
    assert layouts_of("moe", everything) == ["ep2", "ep2_tp2"] and layouts_of("moe", ["tp2"]) == []
    assert layouts_of("hybrid", ["tp2", "ep2"]) == ["tp2", "ep2"]
    assert [world_size(LAYOUTS[x]) for x in everything] == [2, 2, 2, 4, 2, 4, 2]
    write_corpus(tmp_path / "corpus")
    for layout, micro in (("ep2", 1), ("ep2_tp2", 1), ("tp2", 2), ("cp2", 2)):
        raw = run_config(tmp_path / "model", tmp_path, tmp_path / layout, LAYOUTS[layout], export=False)
        cfg = validate(raw)
        assert cfg.train.micro_batch_size == micro and cfg.train.grad_accum == 2
        assert cfg.parallel.expert == LAYOUTS[layout].get("expert", 1) and cfg.parallel.zero_stage == 1
        assert cfg.parallel.tensor == LAYOUTS[layout].get("tensor", 1)
        replicas = world_size(LAYOUTS[layout]) // cfg.parallel.tensor // cfg.parallel.context
        assert micro * cfg.train.grad_accum * replicas == 4
    assert trained({"kind": "moe", "cells": {"ep2": "equal", "one_process": "trains"}})
    assert not trained({"kind": "moe", "cells": {"tp2": "refused: mixture of experts (num_experts=8)"}})
    assert not trained({"kind": "hybrid", "cells": {"tp2": "refused: hybrid"}})


@pytest.mark.unit
def test_which_types_are_covered():
    """--kind keeps one kind; a type none of whose layouts is chosen is skipped; a type with a cell at each chosen
    layout of its kind is done (a record of a mixture of experts refused at the dense layouts is not)."""
    from bench.coverage import to_cover

    types = ["llama", "mixtral", "qwen3_5_text"]
    assert to_cover(types, ["ep2", "ep2_tp2"], None, {}) == ["mixtral", "qwen3_5_text"]
    assert to_cover(types, ["ep2", "ep2_tp2"], "moe", {}) == ["mixtral"]
    assert to_cover(types, ["tp2"], "dense", {}) == ["llama"]
    old = {"mixtral": {"kind": "moe", "cells": {"tp2": "refused: x", "tp2_pp2": "refused: x"}},
           "llama": {"kind": "dense", "cells": {"tp2": "equal", "one_process": "trains"}}}
    assert to_cover(types, ["tp2", "ep2"], None, old) == ["mixtral", "qwen3_5_text"]
    done = {**old, "mixtral": {"kind": "moe", "cells": {"ep2": "equal", "one_process": "trains"}}}
    assert to_cover(types, ["tp2", "ep2"], "moe", done) == []


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
def test_moe_records_merge_and_summarise(tmp_path):
    """An earlier record of a mixture of experts refused at the dense layouts is replaced by the one that trained;
    reruns of its layouts merge cell by cell; the summary counts each expert-parallel layout and leaves out the
    dense lines where no dense decoder ran."""
    from bench.coverage_report import load_records, markdown, save_record, summary, summary_text

    path = tmp_path / "results.jsonl"
    reason = "mixture of experts (num_local_experts=8)"
    save_record(path, {"model_type": "mixtral", "kind": "moe", "reason": reason,
                       "cells": {"tp2": f"refused: {reason}"}})
    save_record(path, {"model_type": "mixtral", "kind": "moe", "reason": reason, "steps": {"ep2": STEPS},
                       "cells": {"ep2": "equal", "ep2_tp2": "failed: x", "one_process": "trains"}})
    save_record(path, {"model_type": "mixtral", "kind": "moe", "reason": reason, "steps": {},
                       "cells": {"ep2_tp2": "equal", "one_process": "trains"}})
    save_record(path, {"model_type": "olmoe", "kind": "moe", "reason": reason, "steps": {},
                       "cells": {"ep2": "equal", "ep2_tp2": "refused: no plan", "one_process": "trains"}})
    save_record(path, {"model_type": "dots1", "kind": "not built", "reason": "tiny config: TypeError: x",
                       "cells": {"ep2": "refused: tiny config: TypeError: x"}})
    records = load_records(path)
    assert records["mixtral"]["cells"] == {"ep2": "equal", "ep2_tp2": "equal", "one_process": "trains"}
    assert records["mixtral"]["steps"] == {"ep2": STEPS}
    counts = summary(records)
    assert counts["moe_run"] == 2 and counts["moe_equal_at_both"] == ["mixtral"]
    assert counts["moe_per_layout"]["ep2_tp2"] == {"equal": 1, "refused": 1, "failed": 0}
    assert counts["not_run"] == {"not built": ["dots1"]}
    assert summary_text(counts).splitlines()[:3] == [
        "mixtures of experts run at expert parallelism: 2; equal at both layouts: 1 (mixtral)",
        "EP=2: 2 equal, 0 refused, 0 failed", "EP=2 × TP=2: 1 equal, 1 refused, 0 failed"]
    report = markdown(records, {}, counts)
    assert "| mixtral | trains | equal | equal |  |" in report and "| TP=2 |" not in report
    assert "| dots1 | not built | refused: tiny config: TypeError: x |" in report


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["--types", "lama"], "--types: lama is not a causal-LM model type of transformers; did you mean llama?"),
    (["--types", "llama", "--layouts", "tp4"],
     "--layouts 'tp4': choose from tp2, tp2_sp, pp2, tp2_pp2, ep2, ep2_tp2, cp2"),
    (["--kind", "sparse"], "--kind 'sparse': choose from dense, moe, hybrid")])
def test_bad_input_is_one_line(argv, message, capsys):
    from bench.coverage import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == f"bench coverage: {message}"


@pytest.mark.unit
@pytest.mark.parametrize("results", ["coverage-cpu", "coverage-moe-cpu"])
def test_the_documented_summary_is_the_committed_one(results):
    """docs/benchmarks.md quotes the summaries of bench/results/coverage-cpu (dense decoders) and
    coverage-moe-cpu (mixtures of experts) as the command wrote them."""
    from bench.coverage_report import summary_text

    committed = json.loads((ROOT / "bench/results" / results / "results.json").read_text())
    doc = " ".join((ROOT / "docs/benchmarks.md").read_text().split())
    for line in summary_text(committed["summary"]).splitlines():
        assert " ".join(line.split()) in doc, line


@pytest.mark.subprocess
@pytest.mark.slow
def test_the_command_on_llama_opt_and_mixtral(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench", "coverage", "--types", "llama,opt,mixtral",
                           "--layouts", "tp2,tp2_pp2,ep2", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["model_type"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    llama, opt, mixtral = records["llama"], records["opt"], records["mixtral"]
    assert llama["cells"] == {"tp2": "equal", "tp2_pp2": "equal", "one_process": "trains"}
    assert llama["export"]["from"] == "tp2_pp2" and llama["export"]["status"] == "equal"
    assert llama["steps"]["tp2_pp2"][2]["loss"] == pytest.approx(llama["steps"]["one_process"][2]["loss"], rel=1e-5)
    assert opt["cells"]["tp2"].startswith("refused: parallel.tensor=2:") and "'opt'" in opt["cells"]["tp2"]
    assert opt["cells"]["one_process"] == "trains" and opt["export"]["from"] == "one_process"
    assert mixtral["kind"] == "moe" and mixtral["cells"] == {"ep2": "equal", "one_process": "trains"}
    assert mixtral["export"] == {**mixtral["export"], "from": "one_process", "status": "equal"}
    assert (out / "report.md").is_file() and json.loads((out / "results.json").read_text())["summary"]["moe_run"] == 1
    assert "llama (" in proc.stdout and "EP=2: equal, one process: trains" in proc.stdout
