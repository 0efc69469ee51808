"""Activation recomputation (``parallel.activation_checkpointing``): the same numbers as without it, with
dropout on, in one process and at every parallel layout, and less activation memory."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.memory import SavedActivations
from modeling import recompute
from tests.dist import run_ranks
from tests.helpers import TINY_GPT2, run_configs, step_records, tiny_config, write_corpus
from tests.test_seq2seq_training import T5_SMALL, seq2seq_config, toy_task

DROPOUT = dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


def _loss_and_gradients(model, mode: str, batch: dict):
    model = copy.deepcopy(model)
    recompute.apply(model, mode)
    activations = SavedActivations()
    activations.reset(model)
    torch.manual_seed(11)  # the same dropout draws for every mode
    with torch.autograd.graph.saved_tensors_hooks(activations.pack, activations.unpack):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, activations.peak


def _models():
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the masks the selective wrapper builds must be the model's own
    causal = dict(input_ids=ids, attention_mask=mask, labels=ids)
    for implementation in ("eager", "sdpa"):
        yield f"gpt2-{implementation}", GPT2LMHeadModel(GPT2Config(
            n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=64, attn_implementation=implementation,
            **DROPOUT)), causal
    yield "llama", LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
        vocab_size=64, attention_dropout=0.1)), causal
    yield "t5", T5ForConditionalGeneration(T5Config(
        d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2, vocab_size=64,
        dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0)), dict(input_ids=ids, labels=ids)


@pytest.mark.unit
@pytest.mark.parametrize("name, model, batch", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_recomputation_gives_the_same_loss_and_every_gradient_with_dropout_on(name, model, batch):
    model.train()
    loss, grads, saved = _loss_and_gradients(model, "none", batch)
    for mode in ("full", "selective"):
        loss_r, grads_r, saved_r = _loss_and_gradients(model, mode, batch)
        # the same operations on the same inputs with the same dropout masks: equal up to the order of the
        # backward's accumulations (observed: bitwise equal or ~1e-10 absolute)
        assert torch.allclose(loss_r, loss, rtol=0, atol=1e-6), (name, mode)
        assert grads_r.keys() == grads.keys()
        for key, grad in grads.items():
            assert torch.allclose(grads_r[key], grad, rtol=1e-5, atol=1e-7), (name, mode, key)
        assert saved_r < saved, (name, mode, saved_r, saved)  # it does hold less for the backward


@pytest.mark.unit
def test_a_different_dropout_mask_in_the_recomputation_is_caught():
    """The parity check above can fail: a recomputation that draws new dropout masks changes the gradients."""
    name, model, batch = next(_models())
    model.train()
    _, grads, _ = _loss_and_gradients(model, "none", batch)
    original = torch.utils.checkpoint.checkpoint

    def without_rng_restore(*args, **kwargs):
        return original(*args, **{**kwargs, "preserve_rng_state": False})

    recompute.checkpoint = without_rng_restore
    try:
        _, grads_r, _ = _loss_and_gradients(model, "selective", batch)
    finally:
        recompute.checkpoint = original
    worst = max((grads_r[k] - g).abs().max().item() for k, g in grads.items())
    assert worst > 1e-3, worst


@pytest.mark.unit
def test_full_recomputation_keeps_a_third_of_the_activations_at_8_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=8, n_head=4, n_embd=64, n_positions=512, vocab_size=64)).train()
    batch = dict(input_ids=torch.randint(0, 64, (1, 512)), labels=torch.randint(0, 64, (1, 512)))
    _, _, none = _loss_and_gradients(model, "none", batch)
    _, _, full = _loss_and_gradients(model, "full", batch)
    _, _, selective = _loss_and_gradients(model, "selective", batch)
    # full keeps each block's input (and the logits); selective drops the seq x seq attention scores
    assert full <= 0.35 * none and selective < none, (full, selective, none)


@pytest.mark.unit
def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="parallel.activation_checkpointing='some'"):
        recompute.apply(torch.nn.Linear(1, 1), "some")


LAYOUTS = {
    "TP=2 + SP": dict(parallel__tensor=2, parallel__sequence_parallel=True),
    "PP=2 1F1B": dict(parallel__pipeline=2, parallel__zero_stage=1, train__grad_accum=4),
    "PP=2 interleaved": dict(parallel__pipeline=2, parallel__zero_stage=1, train__grad_accum=4,
                             parallel__schedule="interleaved", parallel__virtual_stages=2),
    "ZeRO-3 DP=2": dict(parallel__zero_stage=3),
}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_layout_trains_the_same_with_recomputation(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    gpt2 = dict(TINY_GPT2, n_layer=4, n_head=4, **DROPOUT)
    cfgs = [tiny_config(tmp_path / f"{i}-{mode}", corpus, model__config=gpt2, train__steps=3,
                        parallel__activation_checkpointing=mode, **sections)
            for i, sections in enumerate(LAYOUTS.values()) for mode in recompute.MODES]
    task = toy_task(tmp_path / "task", train=64, valid=4)
    t5 = dict(T5_SMALL, dropout_rate=0.1)
    cfgs += [seq2seq_config(tmp_path / f"t5-{mode}", task, model__arch="t5", model__config=t5, parallel__tensor=2,
                            train__steps=3, eval__bleu_samples=2, parallel__activation_checkpointing=mode)
             for mode in recompute.MODES]
    histories = run_ranks(run_configs, 2, cfgs, timeout=900)[0]
    for i, name in enumerate([*LAYOUTS, "T5 TP=2"]):
        plain, *recomputed = (step_records(h) for h in histories[3 * i:3 * i + 3])
        for mode, steps in zip(recompute.MODES[1:], recomputed):
            # the same masks and the same operations: observed equal to ~1e-7 relative; three steps carry every
            # gradient into the weights through AdamW
            assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in plain], rel=1e-5), (name, mode)
            assert [r["grad_norm"] for r in steps] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-5), \
                (name, mode)
