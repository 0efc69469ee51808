"""The pipeline stage split reproduces the unsplit HF model: every config feature the chunks' own forwards
rebuild (attention masks with sliding windows and per-layer layer types, rotary scaling) or carry inside the
blocks (attention / MLP biases, GPT-2 attention scaling options) gives the same logits, loss and
gradients as ``model(input_ids)``; a model the chunks cannot split is refused by name up front.
Single process: the chunks need no process group, they are run one after another."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from modeling import pipeline
from modeling.pipeline import check_pipeline_fits, split_chunks
from parallel.cross_entropy import causal_lm_loss
from parallel.partition import stage_specs

pytestmark = pytest.mark.unit

SEQ, WINDOW, VOCAB, LAYERS = 32, 8, 97, 4  # SEQ > WINDOW, so the window changes what attends to what
# weights 10x the HF default: sharper attention, so that every feature below moves the logits well past TOL
INIT = 0.2
DECODER = dict(num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=INIT)
GPT2 = dict(n_layer=LAYERS, n_head=4, n_embd=32, n_positions=64, vocab_size=VOCAB, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, initializer_range=INIT)
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

VARIANTS = {
    "mistral-sliding": lambda: MistralConfig(**DECODER, sliding_window=WINDOW),
    "mistral-sliding-eager": lambda: MistralConfig(**DECODER, sliding_window=WINDOW, attn_implementation="eager"),
    "mistral-no-window": lambda: MistralConfig(**DECODER, sliding_window=None),
    "qwen2-max-window-layers": lambda: Qwen2Config(**DECODER, use_sliding_window=True, sliding_window=WINDOW,
                                                   max_window_layers=1),  # full, sliding, sliding, sliding
    "qwen2-mixed-layer-types": lambda: Qwen2Config(**DECODER, use_sliding_window=True, sliding_window=WINDOW,
                                                   layer_types=MIXED),
    "qwen2-mixed-eager": lambda: Qwen2Config(**DECODER, use_sliding_window=True, sliding_window=WINDOW,
                                             layer_types=MIXED, attn_implementation="eager"),
    "qwen2-attention-bias": lambda: Qwen2Config(**DECODER),  # Qwen2 has q/k/v biases by construction
    "llama-rope-scaling-linear": lambda: LlamaConfig(**DECODER, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    # max_position_embeddings < SEQ: dynamic NTK rescales the frequencies for this sequence length
    "llama-rope-dynamic": lambda: LlamaConfig(**{**DECODER, "max_position_embeddings": 16},
                                              rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
    "llama-rope-yarn": lambda: LlamaConfig(**DECODER, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-rope-llama3": lambda: LlamaConfig(**DECODER, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama-attention-mlp-bias": lambda: LlamaConfig(**DECODER, attention_bias=True, mlp_bias=True),
    "gpt2-inverse-layer-idx": lambda: GPT2Config(**GPT2, scale_attn_by_inverse_layer_idx=True),
    # the reordered, upcast attention exists only on the eager path
    "gpt2-reorder-upcast-eager": lambda: GPT2Config(**GPT2, reorder_and_upcast_attn=True,
                                                    scale_attn_by_inverse_layer_idx=True,
                                                    attn_implementation="eager"),
}
NO_ROPE_SCALING = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
FEATURE_OFF = {  # the same config without the feature, to show that the feature changes the model
    "llama-rope-scaling-linear": NO_ROPE_SCALING, "llama-rope-dynamic": NO_ROPE_SCALING,
    "llama-rope-yarn": NO_ROPE_SCALING, "llama-rope-llama3": NO_ROPE_SCALING,
    "gpt2-inverse-layer-idx": {"scale_attn_by_inverse_layer_idx": False},
    "gpt2-reorder-upcast-eager": {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False},
}
MIXED_TYPES = ["qwen2-max-window-layers", "qwen2-mixed-layer-types", "qwen2-mixed-eager"]
SLIDING = ["mistral-sliding", "mistral-sliding-eager", "qwen2-max-window-layers", "qwen2-mixed-layer-types",
           "qwen2-mixed-eager"]

# fp32, the same modules applied to the same tensors in the same order, only called chunk by chunk: the
# logits agree to rounding (measured: bit for bit). 1e-5 is far below what a wrong mask or a dropped
# feature gives: a mask built for the wrong layer type moves them far more (negative control), dropping a
# rotary scaling or a GPT-2 attention option by 0.8 to 5 (test_feature_changes_the_unsplit_model).
TOL = 1e-5


def _model(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(VARIANTS[variant]()).eval()
    with torch.no_grad():  # HF initialises biases to zero, which would hide a dropped bias
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.1)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _chunked_logits(model: torch.nn.Module, ids: torch.Tensor, chunks: int = 3) -> torch.Tensor:
    x = ids
    for chunk in split_chunks(model, stage_specs(LAYERS, chunks), SEQ):
        x = chunk(x)
    return x


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_chunks_reproduce_unsplit_logits(variant):
    model = _model(variant)
    check_pipeline_fits(model.config, 3, 1, "uniform")
    ids = _ids()
    with torch.no_grad():
        expected, got = model(ids).logits, _chunked_logits(model, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("variant", sorted(FEATURE_OFF))
def test_feature_changes_the_unsplit_model(variant):
    """The variants are not vacuous: the same weights without the feature give other logits."""
    model = _model(variant)
    config = VARIANTS[variant]()
    for key, value in FEATURE_OFF[variant].items():
        setattr(config, key, value)
    plain = AutoModelForCausalLM.from_config(config).eval()
    plain.load_state_dict(model.state_dict())
    ids = _ids()
    with torch.no_grad():
        diff = (model(ids).logits - plain(ids).logits).abs().max().item()
    assert diff > 100 * TOL, f"{variant}: the feature moves the logits by only {diff:.3g}"


@pytest.mark.parametrize("variant", SLIDING)
def test_chunks_reproduce_unsplit_loss_and_gradients(variant):
    reference, model = _model(variant), _model(variant)
    ids = _ids()
    ref_loss = reference(ids, labels=ids).loss
    ref_loss.backward()
    loss = causal_lm_loss(_chunked_logits(model, ids, chunks=2), ids)
    loss.backward()
    # HF's cross entropy and ours (parallel.cross_entropy) reduce in a different order: the loss is
    # measured <=5e-7 apart and the gradients <=1e-6 relative; a dropped window moves the loss by >2e-4
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda msg, name=name: f"{variant} {name}: {msg}")


@pytest.mark.parametrize("variant", MIXED_TYPES)
def test_negative_control_layer_types_not_cut_per_stage_is_detected(variant, monkeypatch):
    """The check above can fail: chunks that read the full model's layer types from their first block on (the
    stage config not cut to the chunk's blocks) give a later stage the wrong masks."""
    model = _model(variant)
    ids = _ids()

    def uncut(config, blocks):
        staged = copy.copy(config)
        staged.num_hidden_layers = len(blocks)
        return staged

    monkeypatch.setattr(pipeline, "_stage_config", uncut)
    with torch.no_grad():
        diff = (_chunked_logits(model, ids) - model(ids).logits).abs().max().item()
    assert diff > 100 * TOL, f"{variant}: the uncut layer types moved the logits by only {diff:.3g}"


@pytest.mark.parametrize("model_type,final", [("nemotron", ("norm",)), ("nanochat", ())])
def test_model_without_a_stage_plan_is_split_by_its_module_order(model_type, final):
    """Nemotron and NanoChat declare a tensor-parallel plan but no pipeline plan: the stage split is read from
    their base model's modules (embedding, the one block list, the final norm if it has parameters) and
    reproduces their logits; NanoChat's weightless norm also runs before the blocks, so a chunk sends what its
    last block gave."""
    fields = {k: v for k, v in DECODER.items() if k != "initializer_range"}
    config = AutoConfig.for_model(model_type, **fields, pad_token_id=0)
    assert not getattr(config, "base_model_pp_plan", None)
    check_pipeline_fits(config, 2, 1, "uniform")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert pipeline.stage_plan(model) == pipeline.StagePlan("model", ("embed_tokens",), "layers", final)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_chunked_logits(model, ids), model(ids).logits, rtol=0, atol=TOL)


def test_a_base_model_without_one_block_list_is_refused_by_name():
    model = _model("qwen2-attention-bias")
    model.config.base_model_pp_plan = None
    model.model.more_layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"parallel.pipeline=2: model_type 'qwen2' declares no base_model_pp_plan "
                                         r"and its base model has 2 module lists"):
        pipeline.check_stage_modules(model, "parallel.pipeline=2")


def test_layers_that_are_not_attention_are_refused_by_name():
    config = Qwen2Config(**DECODER, layer_types=["full_attention", "linear_attention"] * 2)
    with pytest.raises(ValueError) as error:
        check_pipeline_fits(config, 2, 1, "uniform")
    message = str(error.value)
    assert "parallel.pipeline=2" in message and "layer_types" in message and "linear_attention" in message


@pytest.mark.parametrize("setting", ["parallel.pipeline=2", "parallel.sequence_parallel=true"])
def test_per_layer_inputs_are_refused_at_config_time(setting):
    """Gemma 3n feeds its blocks per-layer embeddings from base-model modules outside the pipeline plan: a stage
    split would copy them onto every stage, a sequence shard would not match them. Checked on the meta model,
    before any weight exists."""
    from modeling.build import meta_model
    from modeling.pipeline import check_stage_modules

    model = meta_model(AutoConfig.for_model("gemma3n_text"))
    with pytest.raises(ValueError, match=rf"{setting}: model_type 'gemma3n_text' has parameters in .*per_layer"):
        check_stage_modules(model, setting)


def test_parameters_outside_the_stage_plan_are_refused_by_name():
    """A base-model module with parameters that the plan places on no stage would be copied onto every one."""
    model = _model("qwen2-attention-bias")
    model.model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"model\.extra"):
        split_chunks(model, stage_specs(LAYERS, 2), SEQ)
