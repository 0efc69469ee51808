"""The model side of ``bench coverage``: which causal-LM types of the installed transformers to try, a tiny random
config of each (every field at its default but the sizes), what kind of model it is (dense attention + MLP
decoder, mixture of experts, hybrid with state-space / linear-attention / convolution mixers), and the tiny
checkpoint a run fine-tunes (``save_pretrained`` with the byte-level tokenizer)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# The sizes of every tiny model: 4 layers (2 per stage at pipeline=2), 4 heads of 16 (2 per rank at tensor=2),
# 2 key-value heads, the byte-level tokenizer's 260 tokens.
SMALL = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 260}
SEQ_LEN = 32
SLIDING_WINDOW = 8  # under SEQ_LEN, so a sliding-window mask differs from the causal one
BYTE_SPECIALS = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}  # modeling.build's byte tokenizer
# A mixture of experts' tiny config: 4 routed experts (2 per rank at expert=2; a default under 4 or unset raised
# to it), top-2 (a smaller default kept, an unset one set), 2 expert groups of which 1 is chosen where the router
# groups them; router noise off, as dropout.
EXPERTS, TOP_K = 4, 2
TOP_K_FIELDS = re.compile(r"^num_experts_per_tok(en)?$|^moe_topk$|^moe_k$")
# Other size fields, by name: (pattern, the tiny value; only ever lowered)
SHRINK = [(re.compile(r"vocab_size"), 260), (re.compile(r"intermediate|ffn_dim|ffn_hidden|^n_inner$"), 128),
          (re.compile(r"lora_rank"), 32), (re.compile(r"rope_head_dim"), 8), (re.compile(r"head_dim$"), 16),
          (re.compile(r"^rotary_dim$"), 16), (re.compile(r"hidden_size_per_layer"), 16),
          (re.compile(r"(^|_)window(_size)?$"), SLIDING_WINDOW),  # Doge's keep_window_size: its dynamic mask's
          (re.compile(r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts)$"), EXPERTS),
          (TOP_K_FIELDS, TOP_K), (re.compile(r"num_kv_shared_layers"), 0),
          (re.compile(r"^(n_group|num_expert_group)$"), 2), (re.compile(r"^topk_group$"), 1),
          (re.compile(r"^attn_layer_offset$"), SMALL["num_hidden_layers"] - 1)]  # Jamba's 1 attention in 8: kept
ROUTER_NOISE = re.compile(r"jitter|router_noise")
DENSE_KINDS = {"full_attention", "sliding_attention"}
EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
MOE_OFF_FLAGS = ("is_moe", "enable_moe_block")  # a config that says its blocks are dense
MOE_STYLES = re.compile(r"moe|expert")
HYBRID_FIELDS = re.compile(r"^(mamba_|ssm_|linear_(conv|num|key|value|head|attn)|conv_l_cache|conv_kernel|"
                           r"short_conv|layers_block_type|attn_layer_(indices|period)|n_recurrent_layers)")
HYBRID_MODULES = re.compile(r"mamba|ssm|conv|linear_?attn|gated_?delta|recurren|mixer", re.IGNORECASE)
EXPERT_MODULES = re.compile(r"(^|\.)(experts|moe|block_sparse_moe|sparse_moe)(\.|$)", re.IGNORECASE)


def causal_lm_types() -> list[str]:
    """Every model type of the installed transformers with a causal-LM class, in its mapping's order."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def hand_planned_types() -> list[str]:
    """colonnade's own hand-written plans for decoder-only causal LMs (``modeling.tp_plans``' and
    ``modeling.pipeline``'s tables, ``PLANS``/``DECODERS`` or, after the move to transformers' declarations,
    ``HAND_WRITTEN``); encoder-decoder types (T5, BART, Marian: their causal-LM classes are decoder halves that
    colonnade's seq2seq plans do not describe) left out; gpt2 if none of those tables is there."""
    import importlib

    found: set[str] = set()
    for module, tables in (("modeling.tp_plans", ("PLANS", "HAND_WRITTEN")),
                           ("modeling.pipeline", ("DECODERS", "HAND_WRITTEN"))):
        try:
            loaded = importlib.import_module(module)
        except Exception:  # a module mid-rewrite: the fallback below
            continue
        for table in tables:
            found |= set(getattr(loaded, table, None) or {})
    causal = set(causal_lm_types())
    decoders = {t for t in found & causal if not getattr(default_config(t), "is_encoder_decoder", False)}
    return sorted(decoders or {"gpt2"})


def default_config(model_type: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type)


def declared_tp_plan(config: Any) -> dict[str, str]:
    """The config's own ``base_model_tp_plan`` (module pattern -> style); {} where it declares none."""
    return dict(getattr(config, "base_model_tp_plan", None) or {})


def enumerate_types() -> tuple[list[str], dict[str, str]]:
    """(the types to cover: each causal-LM type whose default config declares ``base_model_tp_plan`` or is a
    mixture of experts (expert parallelism needs no plan), then colonnade's hand-planned ones; {type: why its
    default config cannot be built})."""
    chosen, broken = [], {}
    for model_type in causal_lm_types():
        try:
            config = default_config(model_type)
        except Exception as exc:  # noqa: BLE001 - any library error is this type's one-line reason
            broken[model_type] = one_line_error(exc)
            continue
        if declared_tp_plan(config) or moe_reason(config):
            chosen.append(model_type)
    chosen += [t for t in hand_planned_types() if t not in chosen]
    return chosen, broken


def one_line_error(exc: BaseException) -> str:
    """``TypeName: message`` on one line, at most 300 characters."""
    text = " ".join(str(exc).split()) or repr(exc)
    line = f"{type(exc).__name__}: {text}"
    return line if len(line) <= 300 else line[:297] + "..."


def _known_fields(config: Any) -> dict[str, Any]:
    """The config's fields and values, with the names its ``attribute_map`` gives them (GPT-2's ``n_layer`` as
    ``num_hidden_layers``) too."""
    fields = config.to_dict()
    for alias, name in getattr(config, "attribute_map", {}).items():
        if name in fields:
            fields.setdefault(alias, fields[name])
    return fields


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _size_fields(default: Any) -> dict[str, Any]:
    """The tiny sizes for the fields ``default`` has: ``SMALL``, the ``SHRINK`` patterns (only ever lowering a
    value; a mixture of experts' expert counts under ``EXPERTS`` raised to it), the sliding window, the byte
    tokenizer's special tokens."""
    fields = _known_fields(default)
    sizes = {k: v for k, v in SMALL.items() if k in fields}
    for name, value in fields.items():
        if name in sizes or not _is_int(value):
            continue
        tiny = next((small for pattern, small in SHRINK if pattern.search(name.lower())), None)
        if tiny is not None and value > tiny:
            sizes[name] = tiny
    if moe_reason(default):
        sizes.update(_expert_counts(fields))
    if "sliding_window" in fields:
        sizes["sliding_window"] = SLIDING_WINDOW
    sizes.update({k: v for k, v in BYTE_SPECIALS.items() if k in fields})
    return {**sizes, **_latent_attention_sizes(fields, sizes)}


def _expert_counts(fields: dict[str, Any]) -> dict[str, int]:
    """A mixture of experts' expert counts under ``EXPERTS`` raised to it (unset ones too where none is set), its
    unset top-k at ``TOP_K``: transformers' model cannot route with None (DeepSeek-V2's default top-k)."""
    counts = [f for f in EXPERT_FIELDS if _is_int(fields.get(f))]
    raised = {f: EXPERTS for f in counts if 1 <= fields[f] < EXPERTS}
    if not counts:
        raised.update({f: EXPERTS for f in EXPERT_FIELDS if f in fields and fields[f] is None})
    return {**raised, **{f: TOP_K for f, v in fields.items() if v is None and TOP_K_FIELDS.search(f)}}


def _latent_attention_sizes(fields: dict[str, Any], sizes: dict[str, Any]) -> dict[str, int]:
    """Multi-head latent attention (MiniCPM3, Youtu: ``kv_lora_rank``) ties sizes together: the query-key head
    is the no-rope part plus the rope part, ``head_dim`` is the rope part where the default has it so, and the
    key-value heads are the heads. The tiny sizes keep what the default config keeps."""
    if "kv_lora_rank" not in fields:
        return {}
    tied: dict[str, int] = {}
    nope, rope = sizes.get("qk_nope_head_dim"), sizes.get("qk_rope_head_dim")
    if nope and rope and fields.get("qk_head_dim") == fields["qk_nope_head_dim"] + fields["qk_rope_head_dim"]:
        tied["qk_head_dim"] = nope + rope
    if rope and fields.get("head_dim") == fields.get("qk_rope_head_dim"):
        tied["head_dim"] = rope
    if fields.get("num_key_value_heads") == fields.get("num_attention_heads"):
        tied["num_key_value_heads"] = SMALL["num_attention_heads"]
    return tied


def _resized_lists(config: Any, default: Any) -> dict[str, list]:
    """Per-layer lists of ``config`` still sized for the default depth, cut to ``SMALL``'s (index lists,
    ``*idx*`` / ``*indices*``, without the layers that are gone; per-layer widths at the tiny width), and
    ``layer_types`` with every kind the default has (the last layers take the missing kinds: Gemma 3's 5 sliding
    + 1 full cut to 4 layers keeps a full one)."""
    layers, out = SMALL["num_hidden_layers"], {}
    default_layers = getattr(default, "num_hidden_layers", None) or layers
    for name, value in config.to_dict().items():
        if not isinstance(value, list) or not value or len(value) == layers or name == "layer_types":
            continue
        if re.search(r"idx|indices", name) and all(_is_int(v) for v in value):
            out[name] = [v for v in value if v < layers]
        elif len(value) == default_layers:
            out[name] = [SMALL["intermediate_size"]] * layers if "intermediate" in name else list(value[:layers])
    kinds = list(dict.fromkeys(getattr(default, "layer_types", None) or []))
    current = list(getattr(config, "layer_types", None) or [])
    derived = getattr(type(config), "layer_types", None)  # Jamba's: a property of its layer periods, not a field
    if kinds and not (isinstance(derived, property) and derived.fset is None):
        cut = current if len(current) == layers else list(default.layer_types[:layers])
        missing = [kind for kind in kinds if kind not in cut]
        cut = cut[:layers - len(missing)] + missing
        if cut != current:
            out["layer_types"] = cut
    return out


def tiny_config(model_type: str) -> Any:
    """``AutoConfig.for_model(model_type, **small)``: ``SMALL``'s sizes where the config has the field, other
    sizes lowered (``SHRINK``), a sliding window of ``SLIDING_WINDOW`` where it has one, per-layer lists cut to
    the 4 layers, dropout and router noise off; every other field at its default. Raises what transformers
    raises."""
    from transformers import AutoConfig

    from bench.diverge import without_dropout

    default = default_config(model_type)
    sizes = _size_fields(default)
    config = AutoConfig.for_model(model_type, **sizes)
    lists = _resized_lists(config, default)
    if lists:
        config = AutoConfig.for_model(model_type, **sizes, **lists)
    per_layer = _per_layer_overrides(config, default)
    if per_layer:
        config = AutoConfig.for_model(model_type, **sizes, **lists, per_layer_config=per_layer)
    layers = getattr(config, "num_hidden_layers", None)
    if layers != SMALL["num_hidden_layers"]:
        raise ValueError(f"the tiny config has num_hidden_layers={layers}, not {SMALL['num_hidden_layers']}")
    return without_router_noise(without_dropout(config))


def without_router_noise(config: Any) -> Any:
    """``config`` (and its text config) with every router jitter / noise probability at 0 (in place; returned):
    noise drawn in training makes no two layouts' routes the same."""
    for part in _configs(config):
        for name, value in part.to_dict().items():
            if ROUTER_NOISE.search(name) and isinstance(value, float) and value:
                setattr(part, name, 0.0)
    return config


def _per_layer_overrides(config: Any, default: Any) -> dict[str, dict[str, Any]]:
    """A heterogeneous config's per-layer overrides (Gemma 4's wider heads of its full-attention layers) at the
    tiny sizes: each overridden size scaled as its base field was (512 over a default 256 -> 32 over 16);
    {} where the config has none or they need no change."""
    overrides = config.to_dict().get("per_layer_config")
    if not isinstance(overrides, dict) or not overrides:
        return {}
    base, tiny, changed = default.to_dict(), config.to_dict(), False
    scaled: dict[str, dict[str, Any]] = {}
    for layer, fields in overrides.items():
        scaled[layer] = dict(fields)
        for name, value in fields.items():
            if _is_int(value) and _is_int(base.get(name)) and _is_int(tiny.get(name)) and base[name] != tiny[name]:
                scaled[layer][name] = max(1, value * tiny[name] // base[name])
                changed = changed or scaled[layer][name] != value
    return scaled if changed else {}


def _configs(config: Any) -> list[Any]:
    """The config and, for a composite one (Llama 4, Phi-4 multimodal), its text config."""
    text = getattr(config, "text_config", None)
    return [config] + ([text] if text is not None and text is not config else [])


def moe_reason(config: Any) -> str | None:
    """Why ``config`` is a mixture of experts (an expert count, or expert styles in its tensor-parallel plan), or
    None; a config that says its blocks are dense (``is_moe``/``enable_moe_block`` false) is not one."""
    for part in _configs(config):
        fields = part.to_dict()
        if any(fields.get(flag) is False for flag in MOE_OFF_FLAGS):
            return None
        counts = [f"{f}={fields[f]}" for f in EXPERT_FIELDS if _is_int(fields.get(f)) and fields[f] >= 1]
        if counts:
            return f"mixture of experts ({', '.join(counts)})"
        plan = declared_tp_plan(part)
        styles = sorted({style for style in plan.values() if MOE_STYLES.search(style)})
        if styles:
            return f"mixture of experts (tensor-parallel plan styles {', '.join(styles)})"
    return None


def hybrid_reason(config: Any) -> str | None:
    """Why ``config`` is not all attention + MLP blocks: ``layer_types`` with other kinds, or fields of state-space,
    linear-attention or convolution mixers; None for a dense decoder."""
    for part in _configs(config):
        fields = part.to_dict()
        kinds = sorted(set(fields.get("layer_types") or []) - DENSE_KINDS)
        if kinds:
            return f"hybrid (layer_types has {', '.join(kinds)})"
        mixers = [name for name in fields if HYBRID_FIELDS.search(name.lower())]
        if mixers:
            return f"hybrid (state-space / linear-attention / convolution fields {', '.join(mixers[:3])})"
    return None


def module_reason(model: Any) -> tuple[str, str] | None:
    """(kind, why) where the built model holds more than attention + MLP blocks: ``moe`` for an ``experts``
    module, ``hybrid`` for mamba, convolution or linear-attention mixers; None for a dense decoder."""
    names = [name for name, _ in model.named_modules()]
    experts = next((n for n in names if EXPERT_MODULES.search(n)), None)
    if experts:
        return "moe", f"mixture of experts (module {experts})"
    mixer = next((n for n in names if HYBRID_MODULES.search(n.rsplit(".", 1)[-1])), None)
    return ("hybrid", f"hybrid (module {mixer})") if mixer else None


MAX_PARAMETERS = 5_000_000  # a tiny config still larger than this keeps default-sized parts (a vision tower)


def meta_model(config: Any) -> Any:
    """The causal LM of ``config`` on the meta device (no storage, no initialisation)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def size_reason(model: Any) -> str | None:
    """Why the tiny model is not tiny (more than ``MAX_PARAMETERS``: nested configs keep their default sizes),
    naming its largest tensor; None when it is."""
    count = sum(p.numel() for p in model.parameters())
    if count <= MAX_PARAMETERS:
        return None
    name, param = max(model.named_parameters(), key=lambda item: item[1].numel())
    return (f"the tiny config still has {count / 1e6:.1f} M parameters (largest {name} {tuple(param.shape)}): "
            f"parts it does not size keep their defaults")


def write_checkpoint(config: Any, directory: Path, seed: int) -> int:
    """The causal LM of ``config`` with weights from transformers' own initialisation under ``seed``, saved with
    ``save_pretrained`` into ``directory`` with the byte-level tokenizer (the checkpoint's own, for the run);
    returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    from modeling.build import byte_level_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    byte_level_tokenizer().save_pretrained(str(directory))
    return sum(p.numel() for p in model.parameters())


def modeling_module(model_type: str) -> str | None:
    """The name of ``model_type``'s modeling module (for the rank server to import once), or None."""
    try:
        module = type(default_config(model_type)).__module__
    except Exception:  # noqa: BLE001 - a config that cannot be built is reported elsewhere
        return None
    return module.replace(".configuration_", ".modeling_")
