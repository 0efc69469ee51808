"""Per-layer activations (issue 37 point 3): the accounting's arithmetic against Korthikanti et al. 2022's Table 2
and Megatron's per-layer term, one traced GPT-2 block against a hand count, the measurement ``bench memory``
makes of a real block against the trace, and the <= 1.10 bar failing with ``parallel.lean_activations`` off."""

from __future__ import annotations

import pytest
import torch

from bench.formulas import layer_activation_bytes

pytestmark = pytest.mark.unit

S, B, H, A = 8, 1, 16, 2  # the tiny GPT-2 block: 8 tokens, 2 heads of 8
TINY = ["model.config.n_layer=3", f"model.config.n_head={A}", f"model.config.n_embd={H}",
        f"model.config.n_positions={S}", f"data.seq_len={S}"]


@pytest.mark.parametrize("t", [1, 2, 8])
def test_korthikanti_table_2(t):
    """Table 2 of the paper, per layer in 16-bit: none sbh(10 + 24/t + 5as/(ht)), SP sbh/t (34 + 5as/h),
    selective sbh(10 + 24/t), selective + SP 34 sbh/t, full 2sbh; GPT-3 175B's shape (s 2048, h 12288, a 96)."""
    s, b, h, a = 2048, 1, 12288, 96
    sbh = s * b * h

    def total(**kw):
        return layer_activation_bytes(s, b, h, a, tensor=t, **kw)["total"]

    assert total() == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert total(sequence_parallel=True) == pytest.approx(sbh / t * (34 + 5 * a * s / h))
    assert total(recompute="selective") == pytest.approx(sbh * (10 + 24 / t))
    assert total(recompute="selective", sequence_parallel=True) == pytest.approx(34 * sbh / t)
    assert total(recompute="full") == 2 * sbh
    if t == 8:  # the paper's 175B at t = 8 without recomputation: 23 sbh per layer, 4.25 sbh selective with SP
        assert total() == pytest.approx(23 * sbh) and total(recompute="selective", sequence_parallel=True) == 4.25 * sbh


def test_megatron_swiglu_and_the_adjustments():
    """Megatron's ``compute_activation_memory`` per layer, sbh(18 + 4 ffn/h)/t (SP + selective), is the paper's
    for a 4h MLP and any ffn width; SwiGLU keeps gate|up and their product (6 ffn/h bytes per sbh, 16-bit); no
    dropout takes the masks off; fp32 doubles the values, not the 1-byte masks."""
    s, b, h, a, ffn, t = 4096, 1, 4096, 32, 11008, 4
    sbh = s * b * h
    plain = layer_activation_bytes(s, b, h, a, tensor=t, sequence_parallel=True, recompute="selective", ffn=ffn)
    assert plain["total"] == pytest.approx(sbh * (18 + 4 * ffn / h) / t)
    llama = layer_activation_bytes(s, b, h, a, tensor=t, sequence_parallel=True, recompute="selective", ffn=ffn,
                                   gated=True, attention_dropout=False, hidden_dropout=False, fused_attention=True)
    assert llama["total"] == pytest.approx(sbh * (16 + 6 * ffn / h) / t)  # Llama-2-7B: 32.125 sbh / t
    gqa = layer_activation_bytes(s, b, h, a, kv_heads=8, ffn=ffn, gated=True, attention_dropout=False,
                                 hidden_dropout=False, fused_attention=True)
    assert gqa["total"] == pytest.approx(sbh * (16 + 6 * ffn / h - 2 * 2 * (32 - 8) / 32))  # K, V at 8 of 32 heads
    fp32 = layer_activation_bytes(2048, 1, 1024, 16, element=4)
    assert fp32["total"] == pytest.approx(2048 * 1024 * (66 + 9 * 16 * 2048 / 1024))
    no_dropout = layer_activation_bytes(2048, 1, 1024, 16, attention_dropout=False, hidden_dropout=False)
    assert no_dropout["total"] == pytest.approx(2048 * 1024 * (32 + 2 * 16 * 2048 / 1024))


def _tiny(*sets):
    from training.config import load

    return load("configs/activations_gpt2.yaml", TINY + list(sets))


# one block of the tiny GPT-2 at bf16 with parallel.lean_activations, per sbh: the norms' inputs 2 + 2, the QKV
# input 2, Q|K|V 6 / t, the merged heads 2 / t, the MLP input 2, GELU's input 8 / t (its output recomputed), two
# 1-byte masks; plus the two LayerNorms' fp32 mean and 1/std per token (16 bytes per token); without
# recomputation the softmax output (2), its bool mask (1) and the dropout output (2) per score
HAND = {(1, False): 26, (2, False): 10 + 16 / 2, (2, True): (10 + 16) / 2}


@pytest.mark.parametrize("recompute", ["none", "selective"])
@pytest.mark.parametrize("t,sp", [(1, False), (2, False), (2, True)])
def test_traced_block_is_the_hand_count_and_within_the_bar(t, sp, recompute):
    from bench.plan_layers import trace_layer

    traced = trace_layer(_tiny(f"parallel.tensor={t}", f"parallel.sequence_parallel={str(sp).lower()}",
                               f"parallel.activation_checkpointing={recompute}"), device="cuda")
    stats = 16 * S * B / (t if sp else 1)
    scores = 5 * A * S * S * B / t if recompute == "none" else 0
    assert traced.kept == HAND[t, sp] * S * B * H + stats + scores
    assert traced.reference == "Korthikanti" and traced.ratio <= 1.10


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_lean_off_fails_the_bar(recompute):
    """The mutation: transformers' modules as they are (NewGELU's pieces kept) are above 1.10x the paper."""
    from bench.plan_layers import trace_layer

    traced = trace_layer(_tiny(f"parallel.activation_checkpointing={recompute}", "parallel.lean_activations=false"),
                         device="cuda")
    assert traced.ratio > 1.10


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_measured_block_equals_the_cpu_trace(recompute):
    """What ``bench memory`` measures (``BlockWindow`` over ``SavedActivations``, real CPU tensors through the
    rank's model as ``rank_model`` builds it) is what the planner traces for ``--device cpu`` (where the eager
    attention's functional dropout keeps a bf16 mask), to the byte but for the norms' statistics."""
    import torch.distributed as dist

    from bench.memory import SavedActivations
    from bench.plan_layers import BlockWindow, trace_layer
    from bench.plan_trace import fake_world, full_meta_model
    from modeling.pipeline import blocks_of
    from parallel.groups import ProcessGroups
    from training.assembly import rank_model

    cfg = _tiny(f"parallel.activation_checkpointing={recompute}")
    traced = trace_layer(cfg, device="cpu")
    full = full_meta_model(cfg)
    fake_world(1, 0)
    try:
        model, _ = rank_model(cfg, full, ProcessGroups.from_degrees())
    finally:
        dist.destroy_process_group()
    model = model.to_empty(device="cpu").train()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    activations = SavedActivations()
    activations.reset(model)
    window = BlockWindow(list(blocks_of(model)), activations)
    with torch.autograd.graph.saved_tensors_hooks(activations.pack, activations.unpack):
        model(input_ids=torch.zeros(B, S, dtype=torch.long), use_cache=False).logits.float().sum().backward()
    # CPU's bf16 LayerNorm keeps its per-token mean and 1/std in bf16, the meta kernel (as CUDA's) in fp32
    stats = 0 if recompute == "full" else 2 * 2 * 2 * S * B
    assert window.bytes == traced.kept - stats


def test_model_config_takes_the_attention_implementation():
    """``model.config.attn_implementation`` (the eager attention this bench measures) is a key every HF config
    takes; a misspelt one is still refused."""
    from modeling.config_check import check_keys

    check_keys("gpt2", {"attn_implementation": "eager"})
    with pytest.raises(ValueError, match="did you mean model.config.attn_implementation"):
        check_keys("gpt2", {"attn_implementaton": "eager"})
