"""Generation through a tensor-parallel Hugging Face model: greedy decoding on the vocabulary shards
(``greedy_seq2seq``: no rank gathers the vocabulary), or HF's own ``generate`` with gathered logits (beam search,
and ZeRO-3 where every rank must keep calling the forward)."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch.distributed import ProcessGroup
from transformers import GenerationMixin, PreTrainedModel

from modeling.decoding import Seq2SeqStage
from parallel.comm import gather_from_tensor_parallel_region
from parallel.decode_schedule import Batch, DecodeSchedule, Limits
from parallel.layers import VocabParallelHead
from parallel.sampling import Decoding


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


@torch.no_grad()
def greedy_seq2seq(model: PreTrainedModel, tp_group: ProcessGroup | None, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of an encoder-decoder model for a padded batch of sources, as HF's ``generate``
    gives them (end-of-sequence included, forced at the budget where the model says so), through the
    vocabulary-parallel decoder of ``parallel.decode_schedule``: the encoder runs once, the decoder's self- and
    cross-attention caches are reused. Collective over ``tp_group``."""
    stage = Seq2SeqStage(model)
    eos = model.generation_config.eos_token_id
    limits = Limits(max_new_tokens, frozenset([eos] if isinstance(eos, int) else eos or []),
                    getattr(model.generation_config, "forced_eos_token_id", None))
    schedule = DecodeSchedule(stage, None, stage.vocab_shard(tp_group), Decoding(), limits, torch.float32)
    rows = input_ids.shape[0]
    batch = Batch(torch.arange(rows, device=input_ids.device), input_ids, attention_mask, True,
                  rows=list(range(rows)), prompt_width=input_ids.shape[1])
    outputs = sorted(schedule.run([batch], 1), key=lambda o: o.request)
    return [o.tokens for o in outputs]
