"""Tensor-parallel plans read from transformers' declarations (``modeling.tp_plans``): what the translation
gives for a few families, and what it refuses by name at config time."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modeling.tensor_parallel import _fused_blocks
from modeling.tp_plans import check_tensor_parallel_fits, declared_plan, declared_styles, plan_for

pytestmark = pytest.mark.unit

SMALL = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, head_dim=8,
             intermediate_size=64, vocab_size=64, pad_token_id=0)


def _meta_model(model_type: str, **fields):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**SMALL, **fields}))


def test_llama_declaration_gives_megatron_regions():
    plan = declared_plan(_meta_model("llama"))
    assert plan.declared and plan.blocks == "model.layers"
    assert plan.styles["model.layers.*.self_attn"] == plan.styles["model.layers.*.mlp"] == "region"
    assert plan.styles["model.layers.*.self_attn.q_proj"] == "colwise"
    assert plan.styles["model.layers.*.mlp.down_proj"] == "rowwise"
    assert plan.styles["model.embed_tokens"] == "vocab_embedding" and plan.styles["lm_head"] == "vocab_head"


def test_gathered_and_per_head_styles_are_translated():
    qwen3, olmo2 = declared_plan(_meta_model("qwen3")), declared_plan(_meta_model("olmo2"))
    assert qwen3.styles["model.layers.*.self_attn.q_norm"] == "replicate_reduce_grad"
    assert olmo2.styles["model.layers.*.self_attn.q_proj"] == "colwise_gathered"
    assert olmo2.styles["model.layers.*.self_attn.o_proj"] == "rowwise"  # rowwise_split_input: input kept split


def test_gpt_neox_paths_follow_its_base_model_prefix():
    plan = declared_plan(_meta_model("gpt_neox"))
    assert plan.blocks == "gpt_neox.layers"
    assert plan.styles["gpt_neox.layers.*.attention"] == "region"
    assert plan.styles["gpt_neox.embed_in"] == "vocab_embedding" and plan.styles["lm_head"] == "vocab_head"


def test_supplements_split_what_a_declaration_leaves_whole():
    """HunYuan declares only its embedding, Youtu only its MLP: colonnade adds their attention (and HunYuan's MLP)
    in transformers' styles, through the same translation."""
    hunyuan = declared_plan(_meta_model("hunyuan_v1_dense"))
    assert hunyuan.styles["model.layers.*.self_attn.q_proj"] == "colwise"
    assert hunyuan.styles["model.layers.*.self_attn.query_layernorm"] == "replicate_reduce_grad"
    assert hunyuan.styles["model.layers.*.mlp"] == "region"
    youtu = declared_plan(_meta_model("youtu"))
    assert youtu.styles["model.layers.*.self_attn"] == "region"
    assert youtu.styles["model.layers.*.self_attn.kv_a_proj_with_mqa"] == "replicate_reduce_grad"


def test_hand_written_plans_remain_for_undeclared_models():
    assert not plan_for(_meta_model("gpt2", n_layer=2, n_head=4, n_embd=32)).declared


def test_fused_qkv_is_cut_per_block_by_head_counts():
    config = AutoConfig.for_model("phi3", **SMALL)  # q: 4 heads, k and v: 2 heads each, of 8
    assert _fused_blocks("colwise_gathered", "model.layers.0.self_attn.qkv_proj", 64, config) == (32, 16, 16)
    assert _fused_blocks("colwise_gathered", "model.layers.0.mlp.gate_up_proj", 128, config) == 2
    assert _fused_blocks("colwise_gathered", "model.layers.0.self_attn.q_proj", 32, config) == 1


def test_routed_experts_stay_whole_under_tensor_parallelism():
    """``moe_*`` styles and the expert tensors under them are left to ``parallel.expert``; the attention, shared
    experts and dense MLPs split as declared, and a MoE block beside dense MLPs (``layers.*.mlp``) is a region
    only where it holds a split layer."""
    for model_type in ("mixtral", "qwen3_moe", "deepseek_v3"):
        styles = declared_styles(AutoConfig.for_model(model_type))
        assert not [path for path in styles if ".experts" in path], model_type
        check_tensor_parallel_fits(AutoConfig.for_model(model_type), 2)
    for model_type in ("granitemoe", "phimoe", "gpt_oss", "hunyuan_v1_moe"):  # declared: only the experts
        assert declared_styles(AutoConfig.for_model(model_type))["layers.*.self_attn.o_proj"] == "rowwise"
    assert declared_styles(AutoConfig.for_model("gpt_oss"))["layers.*.self_attn.sinks"] == "colwise"
    assert declared_styles(AutoConfig.for_model("deepseek_v3"))["layers.*.mlp.shared_experts.down_proj"] == "rowwise"
    assert declared_styles(AutoConfig.for_model("deepseek_v3"))["layers.*.self_attn.o_proj"] == "rowwise"


@pytest.mark.parametrize("model_type,reason", [
    ("stablelm", "declares no base_model_tp_plan"),
    ("diffllama", "splits no layer of its blocks"),
    ("qwen3_next", "in_proj_qkvz"),
])
def test_unsupported_declarations_are_refused_by_name(model_type, reason):
    config = AutoConfig.for_model(model_type)
    check_tensor_parallel_fits(config, 1)
    with pytest.raises(ValueError, match=f"parallel.tensor=2: .*{model_type}.*{reason}.*parallel.tensor=1"):
        check_tensor_parallel_fits(config, 2)


def test_gathered_layers_colonnade_cannot_keep_split_are_refused():
    """A gathered linear-attention projection (Qwen3.5's in_proj_qkvz) would feed full-width code a split output."""
    config = AutoConfig.for_model("llama")
    config.base_model_tp_plan = {**config.base_model_tp_plan,
                                 "layers.*.linear_attn.in_proj_qkvz": "colwise_gather_output"}
    with pytest.raises(ValueError, match=r"in_proj_qkvz \('colwise_gather_output'\) is not one of the layers"):
        declared_styles(config)


def test_head_counts_that_do_not_divide_are_refused_with_the_field():
    with pytest.raises(ValueError, match=r"key/value heads \(num_key_value_heads=2\)"):
        check_tensor_parallel_fits(AutoConfig.for_model("qwen3", **SMALL), 4)
    check_tensor_parallel_fits(AutoConfig.for_model("qwen3", **SMALL), 2)


def test_sequence_parallelism_needs_the_attention_split():
    """A plan that splits only the MLP (Youtu's declaration, before colonnade's supplement): with sequence
    parallelism the attention would see one rank's part of the sequence. Refused by name on the meta model; the
    full plan passes."""
    from modeling.build import meta_model
    from modeling.tensor_parallel import check_sequence_parallel_fits

    config = AutoConfig.for_model("llama", **SMALL)
    check_sequence_parallel_fits(meta_model(config))
    config.base_model_tp_plan = {k: v for k, v in config.base_model_tp_plan.items() if ".mlp." in k}
    with pytest.raises(ValueError, match=r"sequence_parallel=true: model.layers.0.self_attn \(LlamaAttention\)"):
        check_sequence_parallel_fits(meta_model(config))
