"""``generate`` through a tensor-parallel Hugging Face model: every rank scores the whole vocabulary."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch.distributed import ProcessGroup
from transformers import GenerationMixin, PreTrainedModel

from parallel.comm import gather_from_tensor_parallel_region
from parallel.layers import VocabParallelHead


def full_logits(model: PreTrainedModel, logits: torch.Tensor, tp_group: ProcessGroup | None) -> torch.Tensor:
    """The logits over the whole vocabulary on every rank (gathered from the shards, padding dropped)."""
    head = model.get_output_embeddings()
    if not isinstance(head, VocabParallelHead):
        return logits
    return gather_from_tensor_parallel_region(logits, tp_group)[..., :head.vocab_size]


@torch.no_grad()
def generate(model: PreTrainedModel, tp_group: ProcessGroup | None, **kwargs: Any) -> torch.Tensor:
    """``model.generate(**kwargs)`` through a tensor-parallel model: its logits are gathered after the
    forward (after any vocabulary bias), so every rank scores the whole vocabulary and picks the same
    tokens, greedy or beam search. Collective over ``tp_group``."""
    def gather(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        output["logits"] = full_logits(model, output["logits"], tp_group)
        return output

    handle = model.register_forward_hook(gather)
    try:
        return cast(GenerationMixin, model).generate(**kwargs)
    finally:
        handle.remove()
