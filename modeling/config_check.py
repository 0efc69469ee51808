"""``model.config`` checked against the HF config class before anything is built or written: every key a field
of the class (or a name its ``attribute_map`` or its own legacy handling understands), every value of the field's
type, and the sizes a model is built from positive and consistent."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import re
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

# Sizes that must be positive for any model (HF's standard names; ``attribute_map`` resolves GPT-2's n_layer ...).
_POSITIVE = ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size", "intermediate_size",
             "num_key_value_heads", "max_position_embeddings", "head_dim")


def build_config(arch: str, fields: dict):
    """``AutoConfig.for_model(arch, **fields)`` with each problem as one ``ValueError`` naming the key."""
    try:
        return AutoConfig.for_model(arch, **copy.deepcopy(fields))  # transformers edits nested dicts in place
    except ValueError as exc:
        raise ValueError(f"model.arch={arch!r}: {exc}") from None
    except Exception as exc:  # huggingface_hub's strict dataclass validation: "Field 'n_layer' expected int ..."
        if type(exc).__name__.startswith("StrictDataclass"):
            field = getattr(exc, "field", None) or _quoted_field(str(exc))
            reason = str(exc).strip().splitlines()[-1].split(f"Field '{field}' ")[-1].split(" (value:")[0]
            raise ValueError(f"model.config.{field}={fields.get(field)!r}: {reason}") from None
        raise


def _quoted_field(message: str) -> str:
    return message.split("'")[1] if message.count("'") >= 2 else "?"


def check_keys(arch: str, fields: dict) -> None:
    """``ValueError`` for a key of ``model.config`` that the ``arch`` config class does not know (a typo such as
    ``n_layers`` would otherwise be stored as an unused attribute and the default used), with "did you mean"."""
    default = build_config(arch, {})
    # attn_implementation: every config takes it (transformers keeps it as ``_attn_implementation``, outside the
    # fields and ``to_dict``): which attention function the model runs, e.g. "eager" or "sdpa"
    known = ({f.name for f in dataclasses.fields(default)} | set(getattr(default, "attribute_map", {}))
             | {"attn_implementation"})
    for key in fields:
        if key in known or _changes_a_field(arch, default, key, fields[key]) or _read_by_model(default, key):
            continue  # a legacy name the class translates (Llama's rope_scaling), an attribute the model reads
        near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean model.config.{near[0]}?" if near else f"see the fields of {type(default).__name__}"
        raise ValueError(f"model.config.{key}: unknown key for model_type {arch!r}; {hint}")


def _changes_a_field(arch: str, default, key: str, value) -> bool:
    try:
        given = build_config(arch, {key: value}).to_dict()
    except ValueError:
        return True  # a key the class reads and refuses: build_config reports it with the full config
    before = default.to_dict()
    return any(given.get(name) != before.get(name) for name in set(given) | set(before) if name != key)


def _read_by_model(default, key: str) -> bool:
    """The architecture's modeling code reads ``config.<key>`` (T5 reads ``config.decoder_start_token_id``, which
    is not a field of its config class) or names it as a string."""
    spec = importlib.util.find_spec(type(default).__module__.replace(".configuration_", ".modeling_"))
    if spec is None or spec.origin is None:
        return False
    name = re.escape(key)
    return re.search(rf"config\.{name}\b|[\"']{name}[\"']", Path(spec.origin).read_text()) is not None


def check_values(hf_config: PretrainedConfig) -> None:
    """``ValueError`` naming the ``model.config`` key whose value no model can be built from."""
    for name in _POSITIVE:
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            raise ValueError(f"model.config.{_user_name(hf_config, name)}={value}: must be a positive integer")
    heads, hidden = getattr(hf_config, "num_attention_heads", None), getattr(hf_config, "hidden_size", None)
    explicit_head_dim = getattr(hf_config, "head_dim", None)
    if isinstance(heads, int) and isinstance(hidden, int) and explicit_head_dim is None and hidden % heads:
        raise ValueError(f"model.config.{_user_name(hf_config, 'hidden_size')}={hidden} is not divisible by "
                         f"model.config.{_user_name(hf_config, 'num_attention_heads')}={heads}: choose a width "
                         f"that the head count divides")


def _user_name(hf_config, standard: str) -> str:
    """The name the class itself uses for a standard size (GPT-2: ``n_layer`` for ``num_hidden_layers``)."""
    return getattr(hf_config, "attribute_map", {}).get(standard, standard)
