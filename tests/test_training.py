"""End-to-end behaviour of the trainer at small sizes: accumulation equivalence, resume, HF export,
metrics files and W&B offline."""

from __future__ import annotations

import json

import pytest
import torch

from tests.dist import run_ranks
from tests.helpers import reference_blocks, run_config, run_configs, step_records, tiny_config, write_corpus

pytestmark = pytest.mark.multiprocess


def test_dp2_equals_dp1_with_accumulation(tmp_path):
    """DP=2 x micro 2 sees the same global batch of 4 as DP=1 x micro 2 x accum 2, step for step."""
    corpus = write_corpus(tmp_path / "corpus")
    dp2 = tiny_config(tmp_path / "dp2", corpus, parallel__zero_stage=1)
    dp1 = tiny_config(tmp_path / "dp1", corpus, parallel__zero_stage=1, train__grad_accum=2)
    two = step_records(run_ranks(run_config, 2, dp2)[0])
    one = step_records(run_ranks(run_config, 1, dp1)[0])
    # Same fp32 math split differently (two ranks' mean vs two accumulated halves): ~1e-7 relative seen.
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=2e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    assert [r["lr"] for r in two] == pytest.approx([r["lr"] for r in one], rel=1e-12)


def test_resume_matches_uninterrupted_run_and_export_reloads(tmp_path):
    """Stop at step 4 (the checkpoint written there), resume in a new run, steps 5..8 match; the HF
    export reloads with from_pretrained and gives the run's own eval loss."""
    from transformers import AutoModelForCausalLM

    corpus = write_corpus(tmp_path / "corpus")
    full = tiny_config(tmp_path / "full", corpus, parallel__zero_stage=2, train__steps=8, train__save_every=4,
                       train__export_hf=True, train__eval_batches=None,
                       logging__wandb={"mode": "offline"})
    resumed = tiny_config(tmp_path / "resumed", corpus, parallel__zero_stage=2, train__steps=8,
                          train__resume=str(tmp_path / "full" / "run" / "checkpoints" / "step_0000004"))
    full_hist, resumed_hist = run_ranks(run_configs, 2, [full, resumed])[0]
    a, b = step_records(full_hist), step_records(resumed_hist)
    assert [r["step"] for r in b] == [5, 6, 7, 8]
    # Resume restores weights, Adam moments, LR schedule and data position exactly: identical floats.
    assert [r["loss"] for r in b] == [r["loss"] for r in a[4:]]
    assert [r["grad_norm"] for r in b] == [r["grad_norm"] for r in a[4:]]

    out = tmp_path / "full" / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    final_eval = [r for r in records if "eval_loss" in r][-1]
    assert final_eval["perplexity"] == pytest.approx(torch.tensor(final_eval["eval_loss"]).exp().item())
    assert (out / "config.yaml").is_file() and (out / "deepspeed.json").is_file()
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline run files"

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert (out / "hf" / "model.safetensors").is_file()
    ids = reference_blocks(full.data.valid_files, full.data.seq_len)  # the data rule, not colonnade's code
    with torch.no_grad():
        nll = model(input_ids=ids, labels=ids).loss  # HF's own mean next-token loss over every block
    # Same weights, same blocks; only the summation order of the eval batches differs.
    assert float(nll) == pytest.approx(final_eval["eval_loss"], rel=1e-5)


def test_zero3_export_and_llama(tmp_path):
    """ZeRO-3 gathers partitioned weights for the export; a Llama-family model trains through Auto classes."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import TINY_LLAMA

    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "llama", corpus, parallel__zero_stage=3, train__steps=3, train__export_hf=True,
                      model__arch="llama", model__config=dict(TINY_LLAMA))
    history = run_ranks(run_config, 2, cfg)[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama" / "run" / "hf")
    assert model.config.model_type == "llama"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert step_records(history)[-1]["loss"] < step_records(history)[0]["loss"]


def _run_without_wandb(cfg):
    import sys

    sys.modules["wandb"] = None  # any `import wandb` now raises ImportError
    from training import run

    return run(cfg).history


def test_wandb_disabled_needs_no_wandb(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "nowandb", corpus, train__steps=2)
    assert len(step_records(run_ranks(_run_without_wandb, 1, cfg)[0])) == 2


def _precision_error(cfg):
    from training import run

    try:
        run(cfg)
    except Exception as exc:
        return str(exc)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA supports fp16")
def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "fp16", corpus, precision="fp16", parallel__zero_stage=1)
    for message in run_ranks(_precision_error, 2, cfg):
        assert message and "precision=fp16 is not supported on this cpu accelerator" in message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpu(tmp_path, precision):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / precision, corpus, precision=precision, parallel__zero_stage=2, train__steps=20)
    steps = step_records(run_ranks(run_config, 1, cfg)[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
