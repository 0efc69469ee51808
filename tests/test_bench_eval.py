"""bench eval: sacreBLEU reference value, the sliding-window perplexity against an independent computation,
and the same perplexity through tensor- and pipeline-parallel layouts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.eval import bleu, main, windows
from tests.helpers import TINY_GPT2, write_corpus


@pytest.mark.unit
def test_sacrebleu_readme_example():
    refs = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
            ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    result = bleu(hyps, refs)
    assert round(result["bleu"], 2) == 48.53
    assert result["signature"].startswith("nrefs:2|")


@pytest.mark.unit
def test_windows_score_every_token_once():
    for n, max_length, stride in [(100, 32, 16), (100, 32, 32), (10, 32, 8), (33, 32, 31)]:
        spans = list(windows(n, max_length, stride))
        assert sum(new for _, _, new in spans) == n and spans[-1][1] == n
        assert all(end - begin <= max_length for begin, end, _ in spans)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling.build import byte_level_tokenizer

    root = tmp_path_factory.mktemp("eval")
    tok = byte_level_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), eos_token_id=tok.eos_token_id, **dict(TINY_GPT2, n_layer=4, n_head=4))
    GPT2LMHeadModel(config).save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    corpus = write_corpus(root / "corpus", n_files=1, words=60)
    return root, corpus / "part0.txt"


def _independent_perplexity(model_dir, text_file, max_length, stride):
    """The transformers guide's loop with exact token weighting, on the plain HF model."""
    from transformers import AutoModelForCausalLM

    from modeling.build import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([load_tokenizer(model_dir)(text_file.read_text(), add_special_tokens=False)["input_ids"]])
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + max_length, ids.shape[1])
        trg_len = end - prev_end
        window = ids[:, begin:end]
        targets = window.clone()
        targets[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids=window).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], targets[0, 1:], ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((targets[0, 1:] != -100).sum())
        prev_end = end
        if end == ids.shape[1]:
            break
    return math.exp(total / count)


@pytest.mark.subprocess
def test_perplexity_matches_independent_computation_and_layouts(exported, tmp_path):
    root, text = exported
    expected = _independent_perplexity(root / "hf", text, 32, 16)
    results = {}
    for tensor, pipeline in [(1, 1), (2, 1), (1, 2)]:
        results[(tensor, pipeline)] = main(["--model", str(root / "hf"), "--text", str(text), "--max-length", "32",
                                            "--stride", "16", "--tensor", str(tensor), "--pipeline",
                                            str(pipeline)])
    # Same weights and windows; TP and PP change only the summation order of fp32 matmuls and the loss
    # reduction (~1e-7 relative on the mean NLL). 1e-5 catches a shifted window or an unscored token.
    for layout, result in results.items():
        assert result["perplexity"] == pytest.approx(expected, rel=1e-5), layout
    assert results[(1, 1)]["tokens"] == results[(2, 1)]["tokens"] == results[(1, 2)]["tokens"]


@pytest.mark.subprocess
def test_bleu_of_greedy_generation_through_tp(exported, tmp_path):
    root, _ = exported
    data = tmp_path / "bleu.jsonl"
    data.write_text("\n".join(json.dumps({"source": s, "target": t}) for s, t in
                              [("the cat", " sat on the mat"), ("a dog", " ran to the park")]))
    out = tmp_path / "result.json"
    result = main(["--model", str(root / "hf"), "--bleu-data", str(data), "--max-new-tokens", "8", "--tensor", "2",
                   "--out", str(out)])
    assert 0.0 <= result["bleu"] <= 100.0 and result["signature"].startswith("nrefs:1|")
    assert len(result["hypotheses"]) == 2 and json.loads(out.read_text())["bleu"] == result["bleu"]
