"""Tensor-parallel plans, as data (applied by ``modeling.tensor_parallel``).

Most plans are read from the model's own declaration (``config.base_model_tp_plan``, transformers' styles per
module path; ``declared_plan``). A few are hand-written here because transformers declares none: GPT-2 (its
``Conv1D`` q|k|v), T5, Marian and BART.

A plan maps module-path patterns (``*`` = one path component) to a style:

- ``colwise`` / ``colwise_enter``: ``ColumnParallelLinear`` inside a region / entering the region itself (a
  layer whose parent is the block: an MLP whose layers have no module of their own)
- ``colwise_fused3``: a column layer holding q|k|v as three equal blocks, each split by heads (GPT-2's Conv1D)
- ``colwise_gathered``: a column layer transformers gathers after (``colwise_gather_output``): colonnade keeps
  its output split instead, cutting a fused q|k|v or gate|up weight per block, and the norm over its full width
  that follows becomes a tensor-parallel norm (``parallel.norms``)
- ``colwise_packed``: a column layer holding gate|up as two equal blocks (``packed_colwise``)
- ``rowwise``: ``RowParallelLinear``
- ``vocab_embedding`` / ``vocab_head``: vocabulary-parallel embedding and output projection
- ``region``: the module's input enters the tensor-parallel region once (copy-to-region, or the
  sequence all-gather with sequence parallelism), so the column layers inside need no entry of their own
- ``heads_embedding``: an ``nn.Embedding`` whose embedding dimension indexes attention heads (T5's relative
  attention bias): each rank keeps the columns of its heads
- ``replicate``: parameters kept whole on every rank
- ``replicate_reduce_grad``: kept whole, but fed by this rank's heads only (per-head q/k norms): their gradients
  are summed over the tensor group

plus per-module attributes to divide by the tensor size (e.g. GPT-2's ``split_size``) and the path of the
block list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

STYLES = {"colwise", "colwise_enter", "colwise_fused3", "colwise_gathered", "colwise_packed", "rowwise",
          "vocab_embedding", "vocab_head", "region", "heads_embedding", "replicate", "replicate_reduce_grad"}
COLUMN_STYLES = ("colwise", "colwise_enter", "colwise_fused3", "colwise_gathered", "colwise_packed")

# transformers' declared style -> colonnade's. Embedding styles are not listed: the input embedding and the
# output head are always vocabulary-parallel.
DECLARED = {"colwise": "colwise", "colwise_gather_output": "colwise_gathered", "packed_colwise": "colwise_packed",
            "rowwise": "rowwise", "rowwise_split_input": "rowwise",
            "replicated_with_grad_allreduce": "replicate_reduce_grad",
            "mla_kv_a_proj": "replicate_reduce_grad"}  # MLA's latent down-projection: whole on every rank
# Declared styles that ask nothing of colonnade: "local_params" (the module's parameters as plain local tensors,
# which all of colonnade's are).
IGNORED = ("local_params",)
EMBEDDING_STYLES = ("embedding_rowwise", "rowwise")
# The layers transformers gathers around whose split output colonnade knows how to use (attention projections
# and fused q|k|v, gate|up); a gathered output elsewhere (linear-attention projections) is refused.
KEPT_SPLIT = {"colwise_gather_output": {"q_proj", "k_proj", "v_proj", "qkv_proj", "gate_up_proj"},
              "rowwise_split_input": {"o_proj", "down_proj"}}

# Attributes and config fields that count attention heads: divided by the tensor size on the attention modules
# of a declared plan, for forwards that read them (Phi-3 cuts its fused q|k|v by them).
HEAD_COUNTS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads")


@dataclass(frozen=True)
class TPPlan:
    """Module-path pattern -> style; module-path pattern -> attributes divided by the TP size; the path
    of the ``nn.ModuleList`` of transformer blocks (a tuple of paths for encoder-decoder models); buffers
    whose last dimension is the vocabulary (Marian's ``final_logits_bias``), sliced like the output head.
    ``declared``: read from transformers' declaration, which names only what it splits: every other parameter
    is replicated, and the region modules' head counts are divided."""

    styles: dict[str, str]
    blocks: str | tuple[str, ...]
    divide_attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    vocab_buffers: tuple[str, ...] = ()
    declared: bool = False

    def __post_init__(self) -> None:
        unknown = {s for s in self.styles.values() if s not in STYLES}
        if unknown:
            raise ValueError(f"unknown TP styles {sorted(unknown)}; known: {sorted(STYLES)}")


# Hand-written: transformers declares no plan for GPT-2, and its q|k|v is one Conv1D (stored (in, out)).
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

# Hand-written: T5 declares no plan; its relative attention bias is an embedding over heads.
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

# Hand-written: Marian and BART declare no plan (encoder-decoder, cross-attention regions).
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


HAND_WRITTEN = {"gpt2": GPT2, "t5": T5, "marian": BART, "bart": BART}

# What must divide by the tensor-parallel size for the hand-written plans: (config field, what it is).
DIVISIBLE = {
    "gpt2": [("n_head", "attention heads"), ("n_inner", "MLP width")],
    "t5": [("num_heads", "attention heads"), ("d_ff", "feed-forward width")],
    "marian": [("encoder_attention_heads", "encoder attention heads"),
               ("decoder_attention_heads", "decoder attention heads"),
               ("encoder_ffn_dim", "encoder feed-forward width"), ("decoder_ffn_dim", "decoder feed-forward width")],
}
DIVISIBLE["bart"] = DIVISIBLE["marian"]
DECLARED_DIVISIBLE = [("num_attention_heads", "attention heads"), ("num_key_value_heads", "key/value heads"),
                      ("intermediate_size", "MLP width")]


_ATTENTION = {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
              "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise"}
_MLP = {"layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise"}
_HEAD_NORMS = {"layers.*.self_attn.query_layernorm": "replicated_with_grad_allreduce",
               "layers.*.self_attn.key_layernorm": "replicated_with_grad_allreduce"}
# Where a declaration leaves the blocks' attention (or all of them) whole, what Megatron would split, in
# transformers' styles, added to it and read by the same translation.
_LATENT_ATTENTION = {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.q_b_proj": "colwise",
                     "layers.*.self_attn.kv_a_proj_with_mqa": "mla_kv_a_proj",
                     "layers.*.self_attn.kv_b_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise"}
SUPPLEMENTS = {
    # declares only its embedding: Llama's projections, per-head q/k norms
    "hunyuan_v1_dense": {**_ATTENTION, **_MLP, **_HEAD_NORMS},
    # declare only their MLPs: the latent attention split as MiniCPM3 and DeepSeek-V2 declare it
    "youtu": _LATENT_ATTENTION,
    "deepseek_v3": _LATENT_ATTENTION,
    # mixtures of experts whose declarations split only the routed experts, which colonnade leaves to
    # parallel.expert: Llama's attention (GPT-OSS's per-head sinks with it, as Granite SWA declares them)
    "granitemoe": _ATTENTION,
    "granitemoeshared": _ATTENTION,
    "phimoe": _ATTENTION,
    "gpt_oss": {**_ATTENTION, "layers.*.self_attn.sinks": "colwise"},
    "hunyuan_v1_moe": {**_ATTENTION, **_HEAD_NORMS},
}


def declared_styles(config: PretrainedConfig) -> dict[str, str]:
    """``config``'s ``base_model_tp_plan`` in colonnade's styles (paths relative to the base model). ValueError
    naming the model type and the first style colonnade does not split that way (linear-attention projections,
    ...). Routed experts (``moe_*`` styles and the layers under them) are left whole: ``parallel.expert`` splits
    them (``modeling.experts``)."""
    declared = {**(getattr(config, "base_model_tp_plan", None) or {}), **SUPPLEMENTS.get(config.model_type, {})}
    if not declared:
        raise ValueError(f"model_type {config.model_type!r} declares no base_model_tp_plan (transformers), and "
                         f"colonnade has no hand-written plan for it (have {sorted(HAND_WRITTEN)})")
    styles = {}
    experts = tuple(path + "." for path, style in declared.items() if style.startswith("moe"))
    for path, style in declared.items():
        if (style in EMBEDDING_STYLES and "." not in path) or style in IGNORED:
            continue  # the input embedding: vocabulary-parallel by position
        if style.startswith("moe") or path.startswith(experts):
            continue  # routed experts stay whole on each tensor rank; expert parallelism splits them
        if style not in DECLARED:
            raise ValueError(f"model_type {config.model_type!r}: tensor-parallel style {style!r} of {path} is not "
                             f"supported (colonnade splits {sorted(DECLARED)})")
        layer = path.rsplit(".", 1)[-1]
        if style in KEPT_SPLIT and layer not in KEPT_SPLIT[style]:
            raise ValueError(f"model_type {config.model_type!r}: {path} ({style!r}) is not one of the layers "
                             f"colonnade keeps split ({sorted(KEPT_SPLIT[style])})")
        styles[path] = DECLARED[style]
    if "rowwise" not in styles.values():
        raise ValueError(f"model_type {config.model_type!r}: its base_model_tp_plan splits no layer of its blocks")
    return styles


def check_tensor_parallel_fits(hf_config: PretrainedConfig, tensor: int) -> None:
    """Raise ValueError naming the config field when the model cannot be split ``tensor`` ways."""
    if tensor == 1:
        return
    model_type = hf_config.model_type
    if model_type in HAND_WRITTEN:
        fields = DIVISIBLE[model_type]
    else:
        try:
            declared_styles(hf_config)
        except ValueError as error:
            raise ValueError(f"parallel.tensor={tensor}: {error}; use parallel.tensor=1") from None
        fields = DECLARED_DIVISIBLE
    for key, what in fields:
        value = getattr(hf_config, key, None)
        if key == "n_inner" and value is None:
            value = 4 * hf_config.n_embd
        if value is None and model_type in HAND_WRITTEN:
            raise ValueError(f"parallel.tensor={tensor}: the {model_type} config has no {key} ({what})")
        if isinstance(value, int) and value % tensor:
            raise ValueError(f"parallel.tensor={tensor} does not divide the model's {what} ({key}={value}); "
                             f"choose a tensor size that divides {value}")


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def declared_plan(model: PreTrainedModel) -> TPPlan:
    """The TPPlan of ``model``'s declaration: its styles under the base model's path, a region at the parent of
    every column layer (the attention, the MLP; a column layer directly in a block enters the region itself),
    the input embedding and output head vocabulary-parallel."""
    base = model.base_model_prefix
    styles = {f"{base}.{path}": style for path, style in declared_styles(model.config).items()}
    blocks = sorted({path.split(".")[1] for path in styles if path.count(".") > 2 and path.split(".")[2] == "*"})
    if len(blocks) != 1:
        raise ValueError(f"model_type {model.config.model_type!r}: its tensor-parallel plan does not name one "
                         f"block list ({blocks})")
    block = f"{base}.{blocks[0]}.*"
    for path, style in list(styles.items()):
        parent = path.rpartition(".")[0]
        if style in COLUMN_STYLES:
            if parent == block:
                styles[path] = "colwise_enter" if style == "colwise" else style
            else:
                styles[parent] = "region"
    for module, style in ((model.get_input_embeddings(), "vocab_embedding"),
                          (model.get_output_embeddings(), "vocab_head")):
        found = _path_of(model, module)
        if found is not None:
            styles[found] = style
    return TPPlan(styles=styles, blocks=f"{base}.{blocks[0]}", declared=True)


def plan_for(model: PreTrainedModel) -> TPPlan:
    """``model``'s tensor-parallel plan: hand-written, else from its declaration."""
    return HAND_WRITTEN.get(model.config.model_type) or declared_plan(model)
