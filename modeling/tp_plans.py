"""Tensor-parallel plans for Hugging Face architectures, as data. A new architecture is a new entry."""

from __future__ import annotations

from parallel.tp_plan import TPPlan

GPT2 = TPPlan(
    blocks="transformer.h",
    styles={
        "transformer.wte": "vocab_embedding",
        "lm_head": "vocab_head",
        "transformer.h.*.attn": "region",
        "transformer.h.*.attn.c_attn": "colwise_fused3",  # Conv1D q|k|v: split per q, k, v, then by heads
        "transformer.h.*.attn.c_proj": "rowwise",
        "transformer.h.*.mlp": "region",
        "transformer.h.*.mlp.c_fc": "colwise",
        "transformer.h.*.mlp.c_proj": "rowwise",
        "transformer.wpe": "replicate",
        "transformer.h.*.ln_1": "replicate",
        "transformer.h.*.ln_2": "replicate",
        "transformer.ln_f": "replicate",
    },
    divide_attributes={"transformer.h.*.attn": ("split_size", "num_heads", "embed_dim")},
)

LLAMA = TPPlan(
    blocks="model.layers",
    styles={
        "model.embed_tokens": "vocab_embedding",
        "lm_head": "vocab_head",
        "model.layers.*.self_attn": "region",
        "model.layers.*.self_attn.q_proj": "colwise",
        "model.layers.*.self_attn.k_proj": "colwise",
        "model.layers.*.self_attn.v_proj": "colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
        "model.layers.*.mlp": "region",
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "model.layers.*.input_layernorm": "replicate",
        "model.layers.*.post_attention_layernorm": "replicate",
        "model.norm": "replicate",
    },
)

PLANS = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA}

# What must divide by the tensor-parallel size, per architecture: (config field, what it is).
DIVISIBLE = {
    "gpt2": [("n_head", "attention heads"), ("n_inner", "MLP width")],
    "llama": [("num_attention_heads", "attention heads"), ("num_key_value_heads", "key/value heads"),
              ("intermediate_size", "MLP width")],
}
DIVISIBLE["mistral"] = DIVISIBLE["qwen2"] = DIVISIBLE["llama"]


def check_tensor_parallel_fits(hf_config, tensor: int) -> None:
    """Raise ValueError naming the config field when the model cannot be split ``tensor`` ways."""
    if tensor == 1:
        return
    model_type = hf_config.model_type
    if model_type not in PLANS:
        raise ValueError(f"parallel.tensor={tensor}: no tensor-parallel plan for model_type {model_type!r} "
                         f"(have {sorted(PLANS)}); add one to modeling/tp_plans.py or use parallel.tensor=1")
    for field, what in DIVISIBLE[model_type]:
        value = getattr(hf_config, field, None)
        if field == "n_inner" and value is None:
            value = 4 * hf_config.n_embd
        if value % tensor:
            raise ValueError(f"parallel.tensor={tensor} does not divide the model's {what} ({field}={value}); "
                             f"choose a tensor size that divides {value}")
