"""Context parallelism on a Hugging Face model (``parallel.context``): the model's attention function is replaced
by one that attends over the whole sequence of the context group, registered with transformers'
``AttentionInterface`` as the selective recomputation is. Everything else in the model works on the rank's own
tokens (``parallel.context.token_indices``): the embeddings and rotary positions from the position ids the task
passes, the MLPs, norms and the head per token.

``ulysses`` (all-to-all over heads, then the model's own attention function, sdpa or eager, on the whole
sequence of H/N heads) where the heads divide; ``ring`` (``parallel.ring_attention``) for any head count.
Transformers builds no mask for a registered function it does not know: the masks here come from the token
indices (causal, and the sliding window a layer passes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup
from transformers import PreTrainedModel

from modeling.recompute import inner_attention
from parallel.context import gather_sequence, group_size, token_indices, ulysses_attention
from parallel.ring_attention import ring_attention

METHODS = ("auto", "ulysses", "ring")
PREFIX = "colonnade_context_"


@dataclass(frozen=True)
class ContextAttention:
    """What an attention module of a context-parallel model needs: its group, the method, the function the
    model called before (``ulysses`` runs it on the gathered heads)."""

    group: ProcessGroup | None
    method: str
    inner: str
    documents: bool = False  # data.separate_documents: the position ids restart per document


class _HeadsView:
    """The attention module as the inner function sees it on this rank's group of heads: its key/value groups
    (after Ulysses repeated too few key/value heads) and its per-head attention sinks."""

    def __init__(self, module: nn.Module, kv_groups: int, sinks: torch.Tensor | None):
        self._module, self.num_key_value_groups = module, kv_groups
        if sinks is not None:
            self.sinks = sinks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def visible(q_index: torch.Tensor, k_index: torch.Tensor, window: int | None) -> torch.Tensor:
    """[..., q, k] True where query token ``q_index`` sees key token ``k_index`` (causal, sliding window)."""
    distance = q_index[..., :, None] - k_index[..., None, :]
    allowed = distance >= 0
    return allowed & (distance < window) if window else allowed


def _document_starts(index: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Each token's document as the index of its first token: equal for the tokens of one document."""
    if positions is None:
        raise ValueError("data.separate_documents with context parallelism: this model does not pass position ids "
                         "to its attention; set data.separate_documents=false or parallel.context=1")
    return index - positions


def _ulysses(module: nn.Module, setting: ContextAttention, query, key, value, kwargs: dict) -> torch.Tensor:
    inner = inner_attention(module, setting.inner)
    window = kwargs.pop("sliding_window", None)
    local_positions = kwargs.pop("position_ids", None)  # this rank's; the inner function sees every token
    whole = gather_sequence(local_positions, setting.group) if setting.documents else None
    sinks = kwargs.pop("s_aux", None)
    if sinks is not None:  # one per head: this rank's head group's (Ulysses gives rank r heads r h/N .. (r+1) h/N)
        sinks = sinks.chunk(group_size(setting.group))[torch.distributed.get_rank(setting.group)]
        kwargs["s_aux"] = sinks

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        view = module if groups == getattr(module, "num_key_value_groups", 1) and sinks is None else \
            _HeadsView(module, groups, sinks)
        if setting.inner.startswith("flash"):  # flash kernels take the window and packed position ids, no mask
            return inner(view, q, k, v, None, sliding_window=window, position_ids=whole, **kwargs)[0]
        mask = None
        if window or whole is not None or setting.inner != "sdpa":  # sdpa alone is causal without a mask
            index = torch.arange(q.shape[2], device=q.device)
            allowed = visible(index, index, window)[None, None]
            if whole is not None:
                starts = _document_starts(index, whole)
                allowed = allowed & (starts[:, :, None] == starts[:, None, :])[:, None]
            mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~allowed, torch.finfo(q.dtype).min)
        return inner(view, q, k, v, mask, **kwargs)[0]

    return ulysses_attention(query, key, value, setting.group, attend)


def _ring(query, key, value, setting: ContextAttention, kwargs: dict) -> torch.Tensor:
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"ring attention has no {name}: set parallel.context_attention=ulysses")
    if kwargs.get("dropout"):
        raise ValueError("ring attention has no attention dropout: set the model's attention dropout to 0")
    size, rank = group_size(setting.group), torch.distributed.get_rank(setting.group)
    index = token_indices(query.shape[2] * size, rank, size, query.device).expand(query.shape[0], -1)
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    docs = _document_starts(index, kwargs.get("position_ids")) if setting.documents else None
    out = ring_attention(query, key, value, index, index, setting.group, scaling, kwargs.get("sliding_window"),
                         docs, docs, balanced=rank)
    return out.transpose(1, 2)


def context_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention function registered for a context-parallel model: [b, s/N, h, d] for this rank's tokens."""
    setting: ContextAttention | None = getattr(module, "context_attention", None)
    if setting is None:
        raise RuntimeError(f"{type(module).__name__} runs context-parallel attention but was not set up for it")
    if attention_mask is not None:  # transformers builds none for this function: the module made its own
        raise ValueError(f"parallel.context: {type(module).__name__} makes its own attention mask from its tokens, "
                         f"which a split sequence cannot; set parallel.context=1")
    if setting.method == "ulysses":
        return _ulysses(module, setting, query, key, value, kwargs), None
    return _ring(query, key, value, setting, kwargs), None


def choose_method(method: str, heads: int, kv_heads: int, size: int) -> str:
    """``ulysses`` where the (rank's) heads split over ``size`` ranks, else ``ring``; ValueError when ``method``
    asks for Ulysses and the heads do not split."""
    splits = heads % size == 0 and (kv_heads % size == 0 or size % kv_heads == 0)
    if method == "ulysses" and not splits:
        raise ValueError(f"parallel.context_attention=ulysses: {heads} query / {kv_heads} key-value heads per "
                         f"tensor-parallel rank do not split over parallel.context={size}; use ring (or auto)")
    return method if method != "auto" else ("ulysses" if splits else "ring")


DROPOUT_KEYS = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")


def check_context_fits(model: PreTrainedModel, context: int, method: str, tensor: int) -> None:
    """ValueError naming the setting and the fix when ``model`` cannot run at ``parallel.context`` with
    ``method``: heads that do not split for Ulysses, attention dropout or logit soft-capping for ring, no
    attention module transformers' interface calls."""
    if context == 1:
        return
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    chosen = choose_method(method, heads // tensor, max(1, kv_heads // tensor), context)
    if not any(type(m).__name__.endswith("Attention") for m in model.modules()):
        raise ValueError(f"parallel.context={context}: model_type {config.model_type!r} has no attention module "
                         f"colonnade can make attend across the context group; set parallel.context=1")
    if chosen != "ring":
        return
    for key in DROPOUT_KEYS:
        if getattr(config, key, 0.0):
            raise ValueError(f"parallel.context={context} with ring attention (the heads do not split for Ulysses "
                             f"or parallel.context_attention=ring): the model's {key}={getattr(config, key)} has no "
                             f"ring implementation; set model.config.{key}: 0.0")
    if any(isinstance(getattr(m, "sinks", None), nn.Parameter) for m in model.modules()):
        raise ValueError(f"parallel.context={context}: ring attention has no attention sinks (model_type "
                         f"{config.model_type!r}); use parallel.context_attention=ulysses")
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError(f"parallel.context={context}: ring attention has no logit soft-capping "
                         f"(model.config.attn_logit_softcapping); use parallel.context_attention=ulysses")


def apply(model: PreTrainedModel, group: ProcessGroup | None, method: str, tensor: int = 1,
          documents: bool = False) -> str:
    """Make ``model`` (its heads split over ``tensor`` ranks) attend across ``group``, within the documents the
    position ids mark when ``documents``; returns the method used (``choose_method``)."""
    from transformers import AttentionInterface

    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    chosen = choose_method(method, heads // tensor, max(1, kv_heads // tensor), group_size(group))
    implementation = model.config._attn_implementation or "eager"
    setting = ContextAttention(group, chosen, implementation, documents)
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            setattr(module, "context_attention", setting)  # noqa: B010 (a plain attribute, not a submodule)
    AttentionInterface.register(PREFIX + "attention", context_attention)
    model.set_attn_implementation(PREFIX + "attention")
    return chosen
