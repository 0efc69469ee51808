"""The zero-bubble backward split on one process: B passes give input and bias gradients only, W passes the
weight gradients, and together they equal plain autograd's, for nn.Linear, GPT-2's Conv1D and a whole HF
model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from modeling.pipeline import defer_weight_grads
from parallel.weight_grad import WeightGradStore, linear
from tests.helpers import TINY_GPT2, TINY_LLAMA

# fp32, the same GEMMs in another order (dY^T X once per use, summed): ~1e-7 observed; a missing or
# doubled micro-batch is off by the size of the gradient itself.
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("transposed", [False, True])
def test_a_linear_used_twice_defers_its_weight_gradient_to_the_w_pass(transposed):
    torch.manual_seed(0)
    weight = torch.randn(5, 3) if transposed else torch.randn(3, 5)  # Conv1D keeps (in, out)
    weight.requires_grad_()
    bias = torch.randn(3, requires_grad=True)
    x1, x2 = torch.randn(4, 2, 5, requires_grad=True), torch.randn(4, 2, 5, requires_grad=True)

    def output(fn):
        return (fn(x1) * torch.linspace(-1, 1, 3)).sum() + fn(x2).pow(2).sum()

    dense = weight.t() if transposed else weight
    output(lambda x: F.linear(x, dense, bias)).backward()
    expected = {name: t.grad.clone() for name, t in (("w", weight), ("b", bias), ("x1", x1), ("x2", x2))}
    for t in (weight, bias, x1, x2):
        t.grad = None

    store = WeightGradStore()
    with store.collecting("mb"):
        output(lambda x: linear(x, weight, bias, store, transposed)).backward()
    assert weight.grad is None  # the B pass leaves the weight alone
    torch.testing.assert_close(bias.grad, expected["b"], **TOL)
    torch.testing.assert_close(x1.grad, expected["x1"], **TOL)
    torch.testing.assert_close(x2.grad, expected["x2"], **TOL)
    [(param, grad)] = store.weight_grads("mb")  # one gradient for the two uses
    assert param is weight and not store.pending()
    torch.testing.assert_close(grad, expected["w"], **TOL)


@pytest.mark.unit
def test_a_backward_outside_a_b_pass_is_an_error():
    weight = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="outside WeightGradStore.collecting"):
        linear(torch.randn(2, 5, requires_grad=True), weight, None, WeightGradStore()).sum().backward()


def _split_backward_grads(model, batches, hand_over=True):
    """Every parameter's gradient over ``batches`` with the backward split: all B passes, then the W passes
    (``hand_over=False``: the mutation that never runs them)."""
    store = WeightGradStore()
    defer_weight_grads(model, store)
    for k, ids in enumerate(batches):
        with store.collecting(k):
            (model(input_ids=ids, labels=ids).loss / len(batches)).backward()
    for k in range(len(batches)) if hand_over else ():
        for weight, grad in store.weight_grads(k):
            weight.grad = grad if weight.grad is None else weight.grad + grad
    return {name: p.grad for name, p in model.named_parameters()}


def _mismatches(model_factory, hand_over: bool) -> list[str]:
    torch.manual_seed(0)
    dense = model_factory()
    batches = [torch.randint(0, 97, (2, 16)) for _ in range(3)]
    for ids in batches:
        (dense(input_ids=ids, labels=ids).loss / len(batches)).backward()
    got = _split_backward_grads(copy.deepcopy(dense), batches, hand_over)
    wrong = []
    for name, param in dense.named_parameters():
        if got[name] is None or not torch.allclose(got[name], param.grad, **TOL):
            wrong.append(name)
    return wrong


MODELS = {"gpt2": lambda: GPT2LMHeadModel(GPT2Config(**TINY_GPT2, vocab_size=97)),
          "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, vocab_size=97))}


@pytest.mark.unit
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_split_backward_of_a_whole_model_equals_autograd_and_skipping_w_is_caught(arch):
    assert _mismatches(MODELS[arch], hand_over=True) == []
    skipped = _mismatches(MODELS[arch], hand_over=False)
    # mutation: without the W passes every matrix of the blocks and the head lacks its gradient
    assert any(".mlp." in name for name in skipped) and len(skipped) >= 4 * 2, skipped


@pytest.mark.unit
def test_an_input_without_gradient_keeps_the_weight_gradient_in_the_backward():
    weight = torch.randn(3, 5, requires_grad=True)
    store = WeightGradStore()
    with store.collecting(0):
        linear(torch.randn(2, 5), weight, None, store).sum().backward()
    assert weight.grad is not None and not store.pending()


def _tensor_parallel_split(mutation: bool = False):
    """Rank function (TP=2): a column-parallel layer whose region entry overlaps its all-reduce with the
    weight-gradient GEMM, then a row-parallel layer; with a store attached, the B pass leaves both weights
    without gradients (the entry does not take the column layer's) and the W pass gives the overlapped
    path's gradients. Returns the largest difference. ``mutation``: the entry ignores the store."""
    import torch.distributed as dist

    from parallel.layers import ColumnParallelLinear, RowParallelLinear
    from parallel.region import RegionEntry
    from training.lifecycle import init_distributed

    init_distributed()
    if mutation:
        RegionEntry.weights_wait_for_w = lambda self: False
    torch.manual_seed(0)
    w1, w2, x = torch.randn(8, 4), torch.randn(4, 8), torch.randn(3, 4)
    group = dist.group.WORLD

    def layers():
        return (ColumnParallelLinear.from_dense(w1, None, group=group, async_grad_reduce=True),
                RowParallelLinear.from_dense(w2, None, group=group))

    def loss(column, row, inputs):
        return row(torch.nn.functional.gelu(column(inputs))).pow(2).sum()

    column, row = layers()
    plain_x = x.clone().requires_grad_()
    loss(column, row, plain_x).backward()
    split_column, split_row = layers()
    store = WeightGradStore()
    split_column.weight_grad_store = split_row.weight_grad_store = store
    split_x = x.clone().requires_grad_()
    with store.collecting(0):
        loss(split_column, split_row, split_x).backward()
    assert split_column.weight.grad is None and split_row.weight.grad is None
    grads = dict((id(w), g) for w, g in store.weight_grads(0))
    return max(float((grads[id(split_column.weight)] - column.weight.grad).abs().max()),
               float((grads[id(split_row.weight)] - row.weight.grad).abs().max()),
               float((split_x.grad - plain_x.grad).abs().max()))


@pytest.mark.multiprocess
def test_tensor_parallel_layers_defer_their_weight_gradients_even_with_the_overlapped_all_reduce():
    from tests.dist import run_ranks

    assert max(run_ranks(_tensor_parallel_split, 2, timeout=120)) < 1e-5
    with pytest.raises(RuntimeError, match="split_column.weight.grad is None"):
        run_ranks(_tensor_parallel_split, 2, True, timeout=120)  # the entry computed the column layer's dW in B
