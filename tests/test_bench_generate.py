"""bench generate: the KV-cache formula by hand (sliding layers, uneven batches, tensor and pipeline splits), and
one small run of the command on a tiny GPT-2 at TP=1 and PP=2 with its int8, pipelining and Hugging Face runs:
every field of result.json is there, each rank's peak KV-cache bytes equal the formula, the tokens equal Hugging
Face's ``generate`` and are the same with 2 batches in flight as with 1, int8 holds fewer weight bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.generate import batch_shapes, cache_formula
from tests.helpers import TINY_GPT2

ROOT = Path(__file__).resolve().parents[1]
REQUESTS, NEW_TOKENS = 5, 4


@pytest.mark.unit
def test_cache_formula_by_hand():
    from transformers import AutoConfig, GPT2Config

    prompts = [[1] * n for n in (3, 6, 4, 2, 5)]
    assert batch_shapes(prompts, 1) == [(5, 6)]
    assert batch_shapes(prompts, 2) == [(3, 6), (2, 5)]
    gpt2 = GPT2Config(n_layer=3, n_embd=32, n_head=4)               # head_dim 8, no sliding layers
    # 2 (K, V) x 3 layers x 5 rows x 4 heads x 8 x (6 + 4 - 1) positions x 4 bytes
    assert cache_formula(gpt2, 1, 1, 0, [(5, 6)], 4) == 2 * 3 * 5 * 4 * 8 * 9 * 4
    # TP=2, PP=2: stage 0 holds blocks 0-1 (uniform split, the extra block first), stage 1 block 2; 2 heads
    assert cache_formula(gpt2, 2, 2, 0, [(3, 6), (2, 5)], 4) == 2 * 2 * 2 * 8 * (3 * 9 + 2 * 8) * 4
    assert cache_formula(gpt2, 2, 2, 1, [(3, 6), (2, 5)], 4) == 2 * 1 * 2 * 8 * (3 * 9 + 2 * 8) * 4
    qwen2 = AutoConfig.for_model("qwen2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                                 max_window_layers=1)   # layer 0 full, layer 1 keeps sliding_window - 1 = 4
    assert cache_formula(qwen2, 1, 1, 0, [(1, 6)], 4) == 2 * 1 * 2 * 8 * (9 + 4) * 4


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling.build import byte_level_tokenizer

    root = tmp_path_factory.mktemp("bench_generate")
    tok = byte_level_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, **TINY_GPT2)
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    out = subprocess.run([sys.executable, "-m", "bench", "generate", "--model", str(root / "model"), "--requests",
                          str(REQUESTS), "--prompt-tokens", "8", "--max-new-tokens", str(NEW_TOKENS), "--layouts",
                          "1x1,1x2", "--int8-layouts", "1x1", "--pipelining", "1x2", "--hf-threads", "1",
                          "--repeats", "1", "--out", str(root / "out")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads((root / "out" / "result.json").read_text()), root / "out"


@pytest.mark.subprocess
@pytest.mark.slow
def test_result_fields_and_files(ran):
    result, out = ran
    assert {"README.md", "result.json", "generate.png"} <= {p.name for p in out.iterdir()}
    assert result["requests"] == REQUESTS and result["max_new_tokens"] == NEW_TOKENS
    assert 4 <= result["prompt_tokens"]["min"] <= result["prompt_tokens"]["max"] <= 8
    assert [(r["layout"], r["world"], r["batches"]) for r in result["layouts"]] == [("TP=1", 1, 1), ("PP=2", 2, 2)]
    for row in result["layouts"]:
        assert row["tokens"] == REQUESTS * NEW_TOKENS
        assert row["ttft_s"] > 0 and row["tpot_s"] > 0 and row["tokens_per_s"] > 0
        assert len(row["ranks"]) == row["world"] and len(row["seconds_all"]) == 1
        for rank in row["ranks"]:
            assert set(rank) >= {"rank", "tp_rank", "pp_rank", "weight_bytes", "cache_bytes", "formula_bytes",
                                 "cache_vs_one_process", "ideal", "ratio_to_ideal"}
    tp1, pp2 = result["layouts"]
    # the two chunks hold every block once and the last stage its own copy of the head (tied to the token
    # embedding, which the first stage holds): nothing of the other stage's (meta) parameters counts
    head = 260 * TINY_GPT2["n_embd"] * 4
    assert sum(r["weight_bytes"] for r in pp2["ranks"]) == tp1["ranks"][0]["weight_bytes"] + head
    assert all(r["weight_bytes"] < tp1["ranks"][0]["weight_bytes"] for r in pp2["ranks"])
    assert [h["threads"] for h in result["hf"]] == [1] and result["hf"][0]["tokens_per_s"] > 0
    assert (out / "README.md").read_text().count("| PP=2 |") >= 3  # the layout row and one cache row per rank


@pytest.mark.subprocess
@pytest.mark.slow
def test_cache_equals_formula_and_one_process_share(ran):
    result, _ = ran
    assert result["checks"]["cache_equals_formula"]
    for row in result["layouts"]:
        for rank in row["ranks"]:
            assert rank["cache_bytes"] == rank["formula_bytes"] > 0
            assert rank["ideal"] == 1 / (row["tensor"] * row["pipeline"])
            assert rank["cache_vs_one_process"] == rank["cache_bytes"] / result["one_process_cache_bytes"]
    assert result["layouts"][0]["ranks"][0]["cache_bytes"] == result["one_process_cache_bytes"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_tokens_equal_hf_pipelining_and_int8(ran):
    result, _ = ran
    assert [row["equal_to_hf"] for row in result["layouts"]] == [REQUESTS, REQUESTS]
    assert result["hf"][0]["equal_to_tp1"] == REQUESTS
    pipe = result["pipelining"]
    assert pipe["pipelined"]["same_tokens"] and pipe["control"]["same_tokens"]
    assert result["checks"]["pipelining_same_tokens"] is True
    assert pipe["pipelined"]["ratio"] > 0 and pipe["control"]["layout"] == "TP=1"
    fp32, int8 = result["int8"]
    assert (fp32["weights"], int8["weights"]) == ("fp32", "int8")
    assert int8["weight_bytes"] < 0.5 * fp32["weight_bytes"]


@pytest.mark.subprocess
def test_bad_layout_is_one_line_before_any_launch():
    out = subprocess.run([sys.executable, "-m", "bench", "generate", "--layouts", "2y1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "'2y1' is not TxP" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
