"""Pipelines inside DeepSpeed ZeRO engines in real training runs, against single-process references."""

from __future__ import annotations

import numpy as np
import pytest

from tests.dist import run_ranks
from tests.helpers import run_configs, step_records, TINY_GPT2, reference_losses, tiny_config, write_corpus

# fp32 as in test_zero_parity / test_tp_training: ~1e-6 relative observed over 10 steps.
LOSS_TOL = 1e-4
NORM_TOL = 1e-4
FOUR_LAYERS = dict(TINY_GPT2, n_layer=4, n_head=4)




def _check(histories, names, ref_loss, ref_norm):
    for name, history in zip(names, histories):
        steps = step_records(history)
        assert len(steps) == 10, name
        assert [r["loss"] for r in steps] == pytest.approx(ref_loss, rel=LOSS_TOL), name
        assert [r["grad_norm"] for r in steps] == pytest.approx(ref_norm, rel=NORM_TOL), name


def test_pp2_dp2_zero2_and_schedules_match_single_process(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    common = dict(parallel__pipeline=2, model__config=FOUR_LAYERS, train__grad_accum=4)
    cfgs = [tiny_config(tmp_path / "z2", corpus, parallel__zero_stage=2, **common),
            tiny_config(tmp_path / "gpipe", corpus, parallel__zero_stage=1, parallel__schedule="gpipe", **common),
            tiny_config(tmp_path / "inter", corpus, parallel__zero_stage=1, parallel__schedule="interleaved",
                        parallel__virtual_stages=2, **common)]
    ref_loss, ref_norm = reference_losses(cfgs[0], global_batch=2 * 4 * 2)  # micro 2 x 4 micro-batches x dp 2
    assert max(ref_norm) > cfgs[0].optim.grad_clip
    histories = run_ranks(run_configs, 4, cfgs, timeout=600)[0]
    _check(histories, ["PP2xDP2 ZeRO-2 1F1B", "PP2xDP2 ZeRO-1 GPipe", "PP2xDP2 ZeRO-1 interleaved"],
           ref_loss, ref_norm)


def test_3d_tp2_pp2_dp2_zero1_matches_single_process(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "3d", corpus, parallel__tensor=2, parallel__pipeline=2, parallel__zero_stage=1,
                      model__config=FOUR_LAYERS, train__grad_accum=2)
    ref_loss, ref_norm = reference_losses(cfg, global_batch=2 * 2 * 2)
    histories = run_ranks(run_configs, 8, [cfg], timeout=900)[0]
    _check(histories, ["TP2xPP2xDP2 ZeRO-1"], ref_loss, ref_norm)


def _tied_weights(cfg):
    from training import run

    result = run(cfg)
    model, groups = result.model, result.groups
    if groups.is_first_stage:
        return "embedding", model.transformer.wte.weight.detach().numpy().copy()
    return "head", model.lm_head.weight.detach().numpy().copy()


def test_tied_embeddings_stay_tied_across_stages(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "tied", corpus, parallel__pipeline=2, parallel__zero_stage=1, train__steps=5,
                      train__grad_accum=2, train__export_hf=True)
    (kind0, first), (kind1, last) = run_ranks(_tied_weights, 2, cfg, timeout=300)
    assert (kind0, kind1) == ("embedding", "head")
    np.testing.assert_array_equal(first, last)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "tied" / "run" / "hf")
    np.testing.assert_array_equal(exported.transformer.wte.weight.detach().numpy(), first)
