"""Activation recomputation with Megatron's modes (``parallel.activation_checkpointing``):

- ``full``: every transformer block keeps only its input; its forward runs again in the backward
  (transformers' own ``activation_checkpointing_enable``, non-reentrant ``torch.utils.checkpoint``).
- ``selective``: only the core attention (scores, softmax, dropout, weighted sum) is recomputed: the model's
  attention function (``config._attn_implementation``: ``eager``, ``sdpa``, ...) is wrapped in a checkpoint and
  registered with transformers' ``AttentionInterface``.

Both work on the HF modules themselves, so the tensor-parallel plan, the pipeline chunks (which call the same
blocks) and ZeRO see the same model. ``torch.utils.checkpoint`` restores the RNG state for the recomputation:
the recomputed dropout masks are the ones of the forward, and the forward draws exactly what it draws without
recomputation.
"""

from __future__ import annotations

import sys

from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

MODES = ("none", "full", "selective")
SELECTIVE_PREFIX = "colonnade_selective_"


def inner_attention(module: nn.Module, implementation: str):
    """The attention function the model would call: its own module's ``eager_attention_forward`` or a
    registered implementation."""
    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[implementation]


def _selective(implementation: str):
    def core_attention(module, query, key, value, attention_mask, **kwargs):
        inner = inner_attention(module, implementation)
        if not module.training:
            return inner(module, query, key, value, attention_mask, **kwargs)
        return checkpoint(inner, module, query, key, value, attention_mask, use_reentrant=False, **kwargs)

    return core_attention


def apply(model: PreTrainedModel, mode: str) -> None:
    """Turn on recomputation ``mode`` for the HF model ``model`` (before it is split into pipeline chunks)."""
    if mode == "full":
        model.config.use_cache = False  # a KV cache is for generation; transformers warns it off per forward
        rng = getattr(model, "tensor_parallel_rng", None)  # the recomputed blocks' split dropout draws too
        extra = {"context_fn": rng.checkpoint_contexts} if rng is not None else {}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False, **extra})
    elif mode == "selective":
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        implementation = model.config._attn_implementation or "eager"
        if implementation.startswith(SELECTIVE_PREFIX):
            return
        name = SELECTIVE_PREFIX + implementation
        AttentionInterface.register(name, _selective(implementation))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])  # the same masks
        model.set_attn_implementation(name)
    elif mode != "none":
        raise ValueError(f"parallel.activation_checkpointing={mode!r}: expected one of {MODES}")
