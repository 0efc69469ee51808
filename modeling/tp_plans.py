"""Tensor-parallel plans for Hugging Face architectures, as data (applied by ``modeling.tensor_parallel``).
A new architecture is a new entry.

A plan maps module-path patterns (``*`` = one path component) to a style:

- ``colwise`` / ``colwise_fused3``: ``ColumnParallelLinear`` (fused: q|k|v blocks split per block) inside a
  region; ``colwise_enter``: one that enters the region itself (an MLP whose layers have no parent module)
- ``rowwise``: ``RowParallelLinear``
- ``vocab_embedding`` / ``vocab_head``: vocabulary-parallel embedding and output projection
- ``region``: the module's input enters the tensor-parallel region once (copy-to-region, or the
  sequence all-gather with sequence parallelism), so the column layers inside need no entry of their own
- ``heads_embedding``: an ``nn.Embedding`` whose embedding dimension indexes attention heads (T5's relative
  attention bias): each rank keeps the columns of its heads
- ``replicate``: parameters kept whole on every rank

plus per-module attributes to divide by the tensor size (e.g. GPT-2's ``split_size``) and the path of the
block list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PretrainedConfig

STYLES = {"colwise", "colwise_enter", "colwise_fused3", "rowwise", "vocab_embedding", "vocab_head", "region",
          "heads_embedding", "replicate"}


@dataclass(frozen=True)
class TPPlan:
    """Module-path pattern -> style; module-path pattern -> attributes divided by the TP size; the path
    of the ``nn.ModuleList`` of transformer blocks (a tuple of paths for encoder-decoder models); buffers
    whose last dimension is the vocabulary (Marian's ``final_logits_bias``), sliced like the output head."""

    styles: dict[str, str]
    blocks: str | tuple[str, ...]
    divide_attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    vocab_buffers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = {s for s in self.styles.values() if s not in STYLES}
        if unknown:
            raise ValueError(f"unknown TP styles {sorted(unknown)}; known: {sorted(STYLES)}")


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

_T5_ATTENTION = {"": "region", ".q": "colwise", ".k": "colwise", ".v": "colwise", ".o": "rowwise"}
T5 = TPPlan(
    blocks=("encoder.block", "decoder.block"),
    styles={
        "shared": "vocab_embedding",
        "encoder.embed_tokens": "vocab_embedding",  # tied to ``shared``: retied after sharding
        "decoder.embed_tokens": "vocab_embedding",
        "lm_head": "vocab_head",
        **{f"*.block.*.layer.*.SelfAttention{k}": v for k, v in _T5_ATTENTION.items()},
        "*.block.*.layer.*.SelfAttention.relative_attention_bias": "heads_embedding",
        **{f"*.block.*.layer.*.EncDecAttention{k}": v for k, v in _T5_ATTENTION.items()},
        "*.block.*.layer.*.DenseReluDense": "region",
        "*.block.*.layer.*.DenseReluDense.wi": "colwise",  # ReLU FFN (t5 v1.0)
        "*.block.*.layer.*.DenseReluDense.wi_0": "colwise",  # gated FFN (t5 v1.1, flan-t5)
        "*.block.*.layer.*.DenseReluDense.wi_1": "colwise",
        "*.block.*.layer.*.DenseReluDense.wo": "rowwise",
        "*.block.*.layer.*.layer_norm": "replicate",
        "*.final_layer_norm": "replicate",
    },
    divide_attributes={"*.block.*.layer.*.SelfAttention": ("n_heads", "inner_dim"),
                       "*.block.*.layer.*.EncDecAttention": ("n_heads", "inner_dim")},
)

_BART_ATTENTION = {"": "region", ".q_proj": "colwise", ".k_proj": "colwise", ".v_proj": "colwise",
                   ".out_proj": "rowwise"}
BART = TPPlan(  # Marian and BART: the same module names; positions sinusoidal (Marian) or learned (BART)
    blocks=("model.encoder.layers", "model.decoder.layers"),
    styles={
        "model.shared": "vocab_embedding",
        "model.encoder.embed_tokens": "vocab_embedding",
        "model.decoder.embed_tokens": "vocab_embedding",
        "lm_head": "vocab_head",
        "model.*.embed_positions": "replicate",
        "model.*.layernorm_embedding": "replicate",
        "model.*.layer_norm": "replicate",
        **{f"model.*.layers.*.self_attn{k}": v for k, v in _BART_ATTENTION.items()},
        **{f"model.*.layers.*.encoder_attn{k}": v for k, v in _BART_ATTENTION.items()},
        "model.*.layers.*.fc1": "colwise_enter",
        "model.*.layers.*.fc2": "rowwise",
        "model.*.layers.*.self_attn_layer_norm": "replicate",
        "model.*.layers.*.encoder_attn_layer_norm": "replicate",
        "model.*.layers.*.final_layer_norm": "replicate",
    },
    vocab_buffers=("final_logits_bias",),
)

PLANS = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "t5": T5, "marian": BART, "bart": BART}

# What must divide by the tensor-parallel size, per architecture: (config field, what it is).
DIVISIBLE = {
    "gpt2": [("n_head", "attention heads"), ("n_inner", "MLP width")],
    "llama": [("num_attention_heads", "attention heads"), ("num_key_value_heads", "key/value heads"),
              ("intermediate_size", "MLP width")],
}
DIVISIBLE["mistral"] = DIVISIBLE["qwen2"] = DIVISIBLE["llama"]
DIVISIBLE["t5"] = [("num_heads", "attention heads"), ("d_ff", "feed-forward width")]
DIVISIBLE["marian"] = DIVISIBLE["bart"] = [
    ("encoder_attention_heads", "encoder attention heads"), ("decoder_attention_heads", "decoder attention heads"),
    ("encoder_ffn_dim", "encoder feed-forward width"), ("decoder_ffn_dim", "decoder feed-forward width")]


def check_tensor_parallel_fits(hf_config: PretrainedConfig, tensor: int) -> None:
    """Raise ValueError naming the config field when the model cannot be split ``tensor`` ways."""
    if tensor == 1:
        return
    model_type = hf_config.model_type
    if model_type not in PLANS:
        raise ValueError(f"parallel.tensor={tensor}: no tensor-parallel plan for model_type {model_type!r} "
                         f"(have {sorted(PLANS)}); add one to modeling/tp_plans.py or use parallel.tensor=1")
    for key, what in DIVISIBLE[model_type]:
        value = getattr(hf_config, key, None)
        if key == "n_inner" and value is None:
            value = 4 * hf_config.n_embd
        if value is None:
            raise ValueError(f"parallel.tensor={tensor}: the {model_type} config has no {key} ({what})")
        if value % tensor:
            raise ValueError(f"parallel.tensor={tensor} does not divide the model's {what} ({key}={value}); "
                             f"choose a tensor size that divides {value}")
