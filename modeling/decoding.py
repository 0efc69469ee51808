"""What one rank runs of a Hugging Face model when decoding: its pipeline stage (the whole model at pipeline=1)
with a KV cache of its own layers, driven by ``parallel.decode_schedule``.

The cache lives where the layers are. A stage's ``StageCache`` is transformers' ``DynamicCache`` built from the
stage's config (its blocks and their layer types), so sliding-window layers keep only their window and a
tensor-parallel rank's attention stores only its own heads (key/value heads included): a rank holds 1/(TP x PP)
of the one-process cache. The blocks call ``cache.update(..., layer_idx)`` with their index in the whole model;
the stage cache counts from its first block.

Each ``Batch`` is a set of requests decoded together: left-padded prompt ids and mask, the rows still running
(finished rows leave the batch and the cache), and the encoder's output for sequence-to-sequence models.
Position ids and masks are those Hugging Face's ``generate`` gives: positions count the real tokens of a row,
and the mask is passed only when some prompt is padded.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, PretrainedConfig, PreTrainedModel

from modeling.losses import vocab_slice
from modeling.pipeline import PipelineChunk
from parallel.decode_schedule import Batch
from parallel.sampling import VocabShard


class StageCache(DynamicCache):
    """The KV cache of one pipeline stage's blocks (``config``: the stage's), indexed by whole-model layer."""

    def __init__(self, config: PretrainedConfig, first_layer: int = 0):
        super().__init__(config=config)
        self.first_layer = first_layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return super().update(key_states, value_states, layer_idx - self.first_layer, *args, **kwargs)


def cache_bytes(cache: Any) -> int:
    """Bytes of the key/value tensors a cache holds."""
    caches = [cache.self_attention_cache, cache.cross_attention_cache] if isinstance(cache, EncoderDecoderCache) \
        else [cache]
    return sum(t.numel() * t.element_size() for c in caches for layer in c.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None and t.numel())


class DecoderStage:
    """One rank's part of a decoder-only model at decoding: the whole model, or a pipeline chunk of it.
    ``forward`` takes token ids (the stage that embeds) or the previous stage's hidden states, and gives hidden
    states, or on the stage with the head the vocabulary shard's logits of each row's last position."""

    pads_left = True

    def __init__(self, model: PreTrainedModel, chunk: PipelineChunk | None = None):
        self.model, self.chunk = model, chunk
        self.embeds = chunk is None or chunk.spec.embed
        self.has_head = chunk is None or chunk.spec.head
        self.first_layer = chunk.spec.blocks.start if chunk is not None else 0
        self.config = cast(PretrainedConfig, chunk.model.config if chunk is not None else model.config)
        self.hidden_size = int(cast(Any, model.get_input_embeddings()).embedding_dim)

    def vocab_shard(self, tp_group: Any) -> VocabShard:
        head = cast(nn.Module, self.model.get_output_embeddings())
        start, valid = vocab_slice(head)
        if valid is None:
            return VocabShard(0, int(self.model.config.vocab_size), None)
        return VocabShard(start, valid, tp_group)

    def begin(self, batch: Batch) -> None:
        batch.cache = StageCache(self.config, self.first_layer)

    def prefill_input(self, batch: Batch) -> torch.Tensor:
        return batch.ids

    def cache_bytes(self, batch: Batch) -> int:
        return cache_bytes(batch.cache)

    def step_input(self, batch: Batch) -> torch.Tensor:
        return batch.ids[batch.rows, -1:]

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        new = x.shape[1]
        inputs = {"cache": batch.cache, "use_cache": True, "attention_mask": batch.model_mask(),
                  "position_ids": batch.positions(new)}
        if self.has_head:
            inputs["logits_to_keep"] = 1
        if self.chunk is None:
            return self.model(input_ids=x, **inputs).logits[:, -1]
        out, hidden = self.chunk.run(x, new, **inputs)
        return out.logits[:, -1] if hidden is None else hidden


class Seq2SeqStage(DecoderStage):
    """An encoder-decoder model (pipeline=1): the encoder runs once per batch at the prefill; every step runs
    the decoder on the last token with the self-attention cache and the cross-attention keys and values cached
    at the first step. Prompts (the encoder's input) are padded on the right."""

    pads_left = False

    def __init__(self, model: PreTrainedModel):
        super().__init__(model)
        self.start_token = int(model.generation_config.decoder_start_token_id
                               if model.generation_config.decoder_start_token_id is not None
                               else model.config.decoder_start_token_id)

    def begin(self, batch: Batch) -> None:
        config = self.model.config
        batch.cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))

    def prefill_input(self, batch: Batch) -> torch.Tensor:
        encoder = cast(Any, self.model).get_encoder()
        hidden = encoder(input_ids=batch.ids, attention_mask=batch.mask).last_hidden_state
        batch.encoder = (hidden, batch.mask)
        start = torch.full((len(batch.rows), 1), self.start_token, dtype=torch.long, device=batch.ids.device)
        batch.ids, batch.mask, batch.padded, batch.prompt_width = start, torch.ones_like(start), False, 1
        return start

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        hidden, mask = batch.encoder
        out = self.model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=x,
                         cache=batch.cache, use_cache=True)
        return out.logits[:, -1]
