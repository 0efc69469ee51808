"""Unmodified HF models sharded by our TP plans (GPT-2's hand-written, the others read from transformers'
declarations) vs the dense model from the same weights:
logits, loss and every parameter gradient (shards gathered and merged back to the HF layout), at tensor
sizes 2 and 4, with and without sequence parallelism, with the input-gradient collective overlapped with the
weight gradients (the training default) and without; and the collectives one block issues."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.dist import run_ranks
from tests.helpers import assert_gradients_match

pytestmark = pytest.mark.multiprocess

# fp32. The sharded model sums partial matmuls across ranks in a different order than the dense GEMM:
# observed max error ~1e-6 on logits of order 1 and gradients of order 1e-2..1. 1e-4 absolute leaves
# margin for other BLAS builds; a mis-sliced head or a missing all-reduce is off by order 1e-1 or more.
TOL = dict(rtol=1e-4, atol=1e-4)

GPT2 = dict(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=261,  # 261: padded at TP 2 and 4
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
LLAMA = dict(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, hidden_size=64,
             intermediate_size=96, max_position_embeddings=32, vocab_size=262)


SMALL = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, head_dim=8,
             intermediate_size=64, max_position_embeddings=32, vocab_size=262, pad_token_id=0)
# A feature of each declared plan the translation must get right, at TP=2 (its handling removed, the
# comparison fails: the negative controls below).
DECLARED = {
    "olmo2": SMALL,  # q/k norms over the full width: split with the tensor-parallel RMS norm
    "phi3": SMALL,  # fused qkv_proj with GQA (q, k, v of unequal sizes), fused gate_up_proj
    "gemma3_text": dict(SMALL, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),  # sqrt(h)
    "qwen3": SMALL,  # per-head q/k norms: partial gradients
    "granite_swa": SMALL,  # attention sinks: a declared colwise on a parameter (one per head)
    "hunyuan_v1_dense": SMALL,  # colonnade's supplement to a declaration that splits nothing in the blocks
    "gpt_neox": dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                     max_position_embeddings=32, vocab_size=262, rotary_pct=0.5),  # fused per-head qkv
}


def _dense_model(arch):
    from modeling.build import build_model

    fields = GPT2 if arch == "gpt2" else DECLARED.get(arch, LLAMA)
    return build_model(pretrained=None, arch=arch, config=dict(fields), vocab_size=None, seed=3)


def _compare(arch, sequence_parallel, async_grad_reduce=True):
    import torch.distributed as dist

    from modeling.losses import lm_loss
    from modeling.shards import full_state_dict
    from modeling.tensor_parallel import tensor_parallelize
    from parallel.comm import gather_from_tensor_parallel_region
    from training.lifecycle import init_distributed

    init_distributed()
    group = dist.group.WORLD
    dense = _dense_model(arch)
    tp = tensor_parallelize(copy.deepcopy(dense), group, sequence_parallel, async_grad_reduce)
    # Initialisation from the same seed gives exactly the slices of the dense weights.
    for name, value in full_state_dict(tp, group).items():
        assert torch.equal(value, dense.state_dict()[name]), name
    ids = torch.randint(0, dense.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = dense(input_ids=ids, labels=ids)
    ref.loss.backward()
    logits = tp(input_ids=ids).logits
    loss = lm_loss(tp, logits, ids, group)
    loss.backward()
    full_logits = gather_from_tensor_parallel_region(logits, group)[..., :dense.config.vocab_size]
    torch.testing.assert_close(full_logits, ref.logits, **TOL)
    torch.testing.assert_close(loss, ref.loss, **TOL)
    return assert_gradients_match(tp, dense, group, TOL)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("world", [2, 4])
def test_tp_model_matches_hf(arch, world):
    assert all(n > 10 for n in run_ranks(_compare, world, arch, False, timeout=300))


def _compare_declared(archs, sequence_parallel, mutation=None):
    """Rank function: ``_compare`` for each of ``archs`` in one launch; with ``mutation`` (a name in
    MUTATIONS) applied first, each comparison's failure instead."""
    if mutation is None:
        return [_compare(arch, sequence_parallel) for arch in archs]
    MUTATIONS[mutation]()
    failures = []
    for arch in archs:
        try:
            _compare(arch, sequence_parallel)
        except AssertionError as error:
            failures.append(str(error).splitlines()[0])
        else:
            failures.append(None)
    return failures


def _local_statistic():
    import parallel.norms

    parallel.norms.sum_over_tensor_parallel_region = lambda x, group: x  # each rank: its slice's squares only


def _no_partial_grad_sums():
    import modeling.tensor_parallel

    modeling.tensor_parallel._sum_partial_grads = lambda *args: None


def _no_embedding_scale():
    import modeling.tensor_parallel

    modeling.tensor_parallel._keep_embedding_scale = lambda *args: None


def _qkv_as_one_block():
    import modeling.tensor_parallel

    modeling.tensor_parallel._fused_blocks = lambda style, name, out, config: 1  # rank 0: all of q and some k


MUTATIONS = {"local norm statistic": _local_statistic, "no partial-gradient sums": _no_partial_grad_sums,
             "no embedding scale": _no_embedding_scale, "q|k|v as one block": _qkv_as_one_block}


def test_declared_plans_match_hf():
    """Families whose plan is read from transformers' declaration, each with the feature its translation must
    handle (DECLARED), at TP=2 and TP=2 with sequence parallelism: logits, loss, every gradient."""
    archs = sorted(DECLARED)
    for sequence_parallel in (False, True):
        counts = run_ranks(_compare_declared, 2, archs, sequence_parallel, timeout=300)[0]
        assert all(n > 10 for n in counts), dict(zip(archs, counts))


@pytest.mark.parametrize("mutation,arch", [("local norm statistic", "olmo2"), ("no partial-gradient sums", "qwen3"),
                                           ("no embedding scale", "gemma3_text"), ("q|k|v as one block", "phi3")])
def test_declared_plan_negative_controls(mutation, arch):
    """The comparison above can fail: each feature's handling, removed, makes its family differ from HF."""
    (failure,) = run_ranks(_compare_declared, 2, [arch], False, mutation, timeout=300)[0]
    assert failure is not None, f"{arch} still matches HF with the mutation {mutation!r}"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sequence_parallel_model_matches_hf(arch):
    assert all(n > 10 for n in run_ranks(_compare, 2, arch, True, timeout=300))


@pytest.mark.parametrize("arch,sequence_parallel", [("llama", False), ("gpt2", True)])
def test_model_matches_hf_with_the_collective_waited_for_first(arch, sequence_parallel):
    """parallel.tp_async_grad_reduce=false: the input-gradient collective completes before the weight GEMMs."""
    assert all(n > 10 for n in run_ranks(_compare, 2, arch, sequence_parallel, False, timeout=300))


def _count_block_collectives(sequence_parallel, arch="gpt2", async_grad_reduce=True):
    import torch.distributed as dist

    from modeling.tensor_parallel import tensor_parallelize
    from training.lifecycle import init_distributed

    init_distributed()
    model = tensor_parallelize(_dense_model(arch), dist.group.WORLD, sequence_parallel, async_grad_reduce)
    block = (model.transformer.h if arch == "gpt2" else model.model.layers)[1]
    counts = {}
    originals = {}
    for name in ("all_reduce", "all_gather", "reduce_scatter", "all_gather_into_tensor", "reduce_scatter_tensor",
                 "broadcast"):
        originals[name] = getattr(dist, name)

        def counted(*args, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return originals[_name](*args, **kwargs)

        setattr(dist, name, counted)
    try:
        seq = 16 // (2 if sequence_parallel else 1)
        hidden = torch.randn(2, seq, model.config.hidden_size, requires_grad=True)
        block._forward_hooks.clear()  # count the block alone, not the model-level sequence gather
        kwargs = {}
        if arch == "llama":
            kwargs["position_embeddings"] = model.model.rotary_emb(hidden, torch.arange(seq).unsqueeze(0))
        out = block(hidden, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        forward = dict(counts)
        counts.clear()
        out.sum().backward()
        backward = dict(counts)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return forward, backward


def test_collectives_per_block():
    """Megatron's figure: 2 all-reduces forward and 2 backward per layer and micro-batch; with sequence
    parallelism 2 all-gathers + 2 reduce-scatters each way instead (backward: 2 more all-gathers, of the regions'
    inputs kept split), plus the sum of the gradients of the
    block's replicated parameters (2 norms x weight, bias + 2 row biases = 6 all-reduces) that sequence
    parallelism needs because each rank saw only its part of the sequence."""
    forward, backward = run_ranks(_count_block_collectives, 2, False, timeout=300)[0]
    assert forward == {"all_reduce": 2} and backward == {"all_reduce": 2}
    forward, backward = run_ranks(_count_block_collectives, 2, True, timeout=300)[0]
    assert forward == {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}
    # the backward gathers each region's input again (it kept only this rank's part), as Megatron's does
    assert backward == {"all_gather_into_tensor": 4, "reduce_scatter_tensor": 2, "all_reduce": 6}


@pytest.mark.parametrize("async_grad_reduce", [True, False])
def test_one_backward_collective_per_region_with_separate_q_k_v(async_grad_reduce):
    """Llama's q, k, v (and gate, up) are separate linears entering one region: one all-reduce of the summed
    input gradient per region, whether it is overlapped with their weight gradients or not."""
    forward, backward = run_ranks(_count_block_collectives, 2, False, "llama", async_grad_reduce, timeout=300)[0]
    assert forward == {"all_reduce": 2} and backward == {"all_reduce": 2}
