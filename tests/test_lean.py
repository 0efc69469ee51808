"""Lean activations (``modeling.lean``): each substitute computes what transformers' module computes (forward
and every gradient bitwise equal, in fp32 and bf16: the substitutes recompute the same operations on the same
inputs), keeps what Megatron's accounting keeps, and is chosen from the module types; mutations of each
substitute fail these checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bench.plan_trace import LiveBytes
from modeling import lean

pytestmark = pytest.mark.unit

TOKENS, HIDDEN, FFN = 64, 32, 96


def _kept_and_grads(module: nn.Module, *inputs: torch.Tensor, seed: int = 3):
    """(output, bytes the forward made that stay alive for the backward, input gradients, parameter
    gradients) of ``module`` on copies of ``inputs``."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    live = LiveBytes()
    torch.manual_seed(seed)
    with live:
        start = live.live
        out = module(*leaves)
        kept = live.live - start - out.untyped_storage().nbytes()
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    grads = [x.grad for x in leaves] + [p.grad for p in module.parameters()]
    return out.detach(), kept, grads


def _lean_copy(module: nn.Module) -> nn.Module:
    """``module`` inside a parent (as in a model), made lean; returns the lean module."""
    holder = nn.Module()
    holder.inner = copy.deepcopy(module)
    lean.apply(holder, True)
    return holder.inner


def _compare(module: nn.Module, *inputs: torch.Tensor):
    """(bytes kept by transformers' module, by the lean one); asserts equal outputs and gradients."""
    reference = _kept_and_grads(copy.deepcopy(module), *inputs)
    substituted = _kept_and_grads(_lean_copy(module), *inputs)
    assert torch.equal(reference[0], substituted[0])
    for a, b in zip(reference[2], substituted[2], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    return reference[1], substituted[1]


def _llama_parts():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN)
    torch.manual_seed(0)
    norm = LlamaRMSNorm(HIDDEN)
    nn.init.normal_(norm.weight, 1.0, 0.1)
    return norm, LlamaMLP(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tanh_gelu_keeps_only_its_input(dtype):
    from transformers.activations import NewGELUActivation

    x = torch.randn(TOKENS, FFN, dtype=dtype)
    kept, lean_kept = _compare(NewGELUActivation(), x)
    assert kept >= 3 * x.nbytes  # pow, tanh and mul pieces of transformers' composite GELU
    assert lean_kept == 0        # the checkpoint holds the input, which the caller made


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_keeps_only_its_input(dtype):
    norm, _ = _llama_parts()
    norm = norm.to(dtype)
    x = torch.randn(TOKENS, HIDDEN, dtype=dtype)
    kept, lean_kept = _compare(norm, x)
    assert kept >= x.nbytes and lean_kept == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_mlp_keeps_its_two_inputs_and_the_product(dtype):
    """Megatron's SwiGLU accounting: gate and up (2f) for the activation and the product, the product (f) for
    the down projection; transformers' module also keeps act(gate) (f)."""
    _, mlp = _llama_parts()
    mlp = mlp.to(dtype)
    x = torch.randn(TOKENS, HIDDEN, dtype=dtype)
    kept, lean_kept = _compare(mlp, x)
    f = TOKENS * FFN * x.element_size()
    assert kept == 4 * f and lean_kept == 3 * f


def test_dropout_keeps_a_one_byte_mask():
    dropout = nn.Dropout(0.1)
    x = torch.randn(TOKENS, HIDDEN)
    kept, lean_kept = _compare(dropout, x)
    assert kept == x.nbytes and lean_kept == x.numel()


def test_bf16_dropout_draws_the_same_and_scales_its_gradient_exactly():
    """In bf16, torch's CPU dropout multiplies the gradient by a bf16 mask holding 1/(1-p) rounded to bf16
    (1.109375 for p = 0.1); ``native_dropout`` (what CUDA's dropout runs) by 1/(1-p) itself: the same masks, the
    gradients within one bf16 unit in the last place (relative 2^-7) of each other."""
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.bfloat16)
    reference = _kept_and_grads(nn.Dropout(0.1), x)
    substituted = _kept_and_grads(_lean_copy(nn.Dropout(0.1)), x)
    assert torch.equal(reference[0], substituted[0])
    torch.testing.assert_close(substituted[2][0], reference[2][0], rtol=2**-7, atol=0)
    assert torch.equal(substituted[2][0] == 0, reference[2][0] == 0)


def test_modules_are_chosen_by_what_they_keep():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=HIDDEN, vocab_size=64))
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         hidden_size=HIDDEN, intermediate_size=FFN, vocab_size=64))
    assert lean.apply(gpt2, True) == {"NewGELUActivation": "recomputed + output recomputed"}
    assert lean.apply(llama, True) == {"LlamaRMSNorm": "recomputed", "SiLUActivation": "output recomputed"}
    assert type(gpt2.transformer.h[0].ln_1) is nn.LayerNorm  # torch's LayerNorm keeps its input and 2 statistics
    assert type(gpt2.transformer.h[0].mlp.dropout) is lean.LeanDropout
    assert lean.apply(copy.deepcopy(gpt2), False) == {} and lean.apply(copy.deepcopy(gpt2), True, "full") == {}
    assert lean.apply(gpt2, True) == {}  # once: lean classes are not made lean again


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_model_is_bitwise_equal_and_keeps_less(arch, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dropout = 0.1 if dtype == torch.float32 else 0.0  # bf16 dropout: test_bf16_dropout_draws_the_same_...
    model = (GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=HIDDEN, vocab_size=64, resid_pdrop=dropout,
                                        embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation="eager"))
             if arch == "gpt2" else
             LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          hidden_size=HIDDEN, intermediate_size=FFN, vocab_size=64)))
    model = model.to(dtype).train()
    ids = torch.randint(0, 64, (2, 32))
    kept, lean_kept = _compare(_LossOf(model), ids.float())
    assert lean_kept < 0.8 * kept


class _LossOf(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        ids = ids.detach().long()
        return self.model(input_ids=ids, labels=ids).loss.float()


# --- mutations: each must fail the checks above ---------------------------------------------------------------
def test_a_recipe_from_the_wrong_tensor_changes_the_gradients(monkeypatch):
    """The recomputed activation output taken as its input (what the parent kept instead) must show."""
    monkeypatch.setattr(lean._Recipe, "compute", lambda self: self.argument)
    _, mlp = _llama_parts()
    with pytest.raises(AssertionError):
        _compare(mlp, torch.randn(TOKENS, HIDDEN))


def test_a_norm_recomputed_without_its_weight_changes_the_gradients(monkeypatch):
    norm, _ = _llama_parts()
    made = lean.lean_leaf(type(norm), True, False)
    own = made.forward

    def forward(self, x):  # the recomputation sees weight 1: a checkpoint over the wrong function
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(lambda y: own(self, y) / self.weight * self.weight.detach(),
                                                     x, use_reentrant=False)
        return own(self, x)

    monkeypatch.setattr(made, "forward", forward)
    with pytest.raises(AssertionError):
        _compare(norm, torch.randn(TOKENS, HIDDEN))


def test_an_undetected_composite_keeps_what_transformers_keeps(monkeypatch):
    """The probe is what finds the composite modules: told a norm keeps nothing extra, the bound fails."""
    monkeypatch.setattr(lean, "probe", lambda module: (0, False))
    norm, _ = _llama_parts()
    kept, lean_kept = _compare(norm, torch.randn(TOKENS, HIDDEN))
    assert lean_kept == kept > 0


def test_an_activation_input_changed_in_place_is_refused():
    argument = torch.randn(TOKENS)
    recipe = lean._Recipe(torch.sigmoid, argument, argument)
    recipe.argument.add_(1)  # the recomputation would not give the forward's output
    with pytest.raises(RuntimeError, match="in place"):
        recipe.compute()


def test_a_dropout_left_to_torch_keeps_a_mask_of_the_inputs_dtype(monkeypatch):
    monkeypatch.setattr(lean.LeanDropout, "forward", nn.Dropout.forward)
    kept, lean_kept = _compare(nn.Dropout(0.1), torch.randn(TOKENS, HIDDEN))
    assert lean_kept == kept == TOKENS * HIDDEN * 4  # not the 1-byte mask test_dropout_keeps_a_one_byte_mask sees
