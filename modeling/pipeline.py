"""Split an HF decoder into pipeline chunks: the first embeds, the middle ones run a range of blocks, the
last applies the final norm and the head. Positions, the attention masks and rotary embeddings are rebuilt
on every chunk from the (known) sequence length, as the model's own forward builds them, so nothing but
hidden states crosses a stage boundary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.pytorch_utils import Conv1D

from parallel.partition import StageSpec, stage_specs
from parallel.weight_grad import WeightGradStore, linear

MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def all_full(config: PretrainedConfig, layer: int) -> str:
    return "full_attention"


def sliding_if_window(config: Any, layer: int) -> str:  # MistralModel.forward
    return "full_attention" if config.sliding_window is None else "sliding_attention"


def per_layer(config: Any, layer: int) -> str:  # Qwen2Model.forward
    return config.layer_types[layer]


def gpt2_embed(parts: nn.ModuleDict, ids: torch.Tensor, context: dict) -> torch.Tensor:  # GPT2Model.forward
    return parts["drop"](parts["wte"](ids) + parts["wpe"](context["position_ids"]))


def token_embed(parts: nn.ModuleDict, ids: torch.Tensor, context: dict) -> torch.Tensor:  # LlamaModel.forward
    return parts["embed_tokens"](ids)


def gpt2_block(block: nn.Module, x: torch.Tensor, mask: Any, context: dict) -> Any:
    return block(x, None, mask, position_ids=context["position_ids"])


def rotary_block(block: nn.Module, x: torch.Tensor, mask: Any, context: dict) -> Any:
    return block(x, attention_mask=mask, position_embeddings=context["rope"], position_ids=context["position_ids"])


@dataclass(frozen=True)
class DecoderParts:
    """An architecture's pipeline adapter: where it keeps its parts (module paths in the HF model; the last
    path of ``head`` is the output layer, the one before it the final norm), how its forward embeds and calls a
    block, and which attention mask (a key of MASKS) it gives block ``i``: ``layer_type(config, i)``."""

    embed: tuple[str, ...]
    blocks: str
    head: tuple[str, ...]
    embed_tokens: Callable[[nn.ModuleDict, torch.Tensor, dict], torch.Tensor]
    run_block: Callable[[nn.Module, torch.Tensor, Any, dict], Any]
    rotary: str | None = None
    layer_type: Callable[[Any, int], str] = all_full


DECODERS = {
    "gpt2": DecoderParts(embed=("transformer.wte", "transformer.wpe", "transformer.drop"), blocks="transformer.h",
                         head=("transformer.ln_f", "lm_head"), embed_tokens=gpt2_embed, run_block=gpt2_block),
    "llama": DecoderParts(embed=("model.embed_tokens",), blocks="model.layers", head=("model.norm", "lm_head"),
                          embed_tokens=token_embed, run_block=rotary_block, rotary="model.rotary_emb"),
}
DECODERS["mistral"] = replace(DECODERS["llama"], layer_type=sliding_if_window)
DECODERS["qwen2"] = replace(DECODERS["llama"], layer_type=per_layer)


def decoder_parts(model: PreTrainedModel) -> DecoderParts:
    """``model``'s ``DecoderParts``, ValueError for an architecture without one."""
    model_type = model.config.model_type
    if model_type not in DECODERS:
        raise ValueError(f"parallel.pipeline: no pipeline stage split for model_type {model_type!r} (have "
                         f"{sorted(DECODERS)}); add its DecoderParts to modeling/pipeline.py")
    return DECODERS[model_type]


def blocks_of(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder's list of transformer blocks."""
    blocks = model.get_submodule(decoder_parts(model).blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{decoder_parts(model).blocks} is a {type(blocks).__name__}, not the nn.ModuleList of blocks")
    return blocks


def num_blocks(model: PreTrainedModel) -> int:
    return len(blocks_of(model))


class PipelineChunk(nn.Module):
    """One model chunk. ``forward(x)``: token ids on the first chunk, hidden states elsewhere; returns
    hidden states, or the (vocabulary-sharded) logits on the last chunk."""

    def __init__(self, model: PreTrainedModel, spec: StageSpec, seq_len: int):
        super().__init__()
        decoder = decoder_parts(model)
        self.spec, self.seq_len, self.decoder = spec, seq_len, decoder
        self.config = model.config
        self.parts = nn.ModuleDict()
        if spec.embed:
            for path in decoder.embed:
                self.parts[path.rsplit(".", 1)[-1]] = model.get_submodule(path)
        all_blocks = blocks_of(model)
        self.blocks = nn.ModuleList(all_blocks[i] for i in spec.blocks)
        self.layer_types = [decoder.layer_type(model.config, i) for i in spec.blocks]
        if spec.head:
            for path in decoder.head:
                self.parts[path.rsplit(".", 1)[-1]] = model.get_submodule(path)
        self.rotary = model.get_submodule(decoder.rotary) if decoder.rotary else None

    @property
    def head(self) -> nn.Module | None:
        return self.parts["lm_head"] if self.spec.head else None

    def _context(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        positions = torch.arange(self.seq_len, device=device).unsqueeze(0)
        shape_probe = torch.empty(batch, self.seq_len, 1, device=device, dtype=dtype)
        # Positional: the embeddings' and the cache's keyword names changed within transformers 5.x.
        masks = {kind: MASKS[kind](self.config, shape_probe, None, None)
                 for kind in set(self.layer_types)}
        context: dict[str, Any] = {"position_ids": positions, "masks": masks}
        if self.rotary is not None:
            context["rope"] = self.rotary(shape_probe, position_ids=positions)
        return context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        dtype = next(self.parameters()).dtype
        context = self._context(batch, x.device, dtype)
        if self.spec.embed:
            x = self.decoder.embed_tokens(self.parts, x, context)
        for block, kind in zip(self.blocks, self.layer_types):
            out = self.decoder.run_block(block, x, context["masks"][kind], context)
            x = out[0] if isinstance(out, tuple) else out
        if self.spec.head:
            norm, output = (path.rsplit(".", 1)[-1] for path in self.decoder.head)
            x = self.parts[output](self.parts[norm](x))
        return x


def split_chunks(model: PreTrainedModel, specs: list[StageSpec], seq_len: int) -> nn.ModuleList:
    """This rank's chunks (in local order) as one module, ready to be wrapped by DeepSpeed."""
    return nn.ModuleList(PipelineChunk(model, spec, seq_len) for spec in specs)


def defer_weight_grads(module: nn.Module, store: WeightGradStore) -> None:
    """Every linear layer of ``module`` leaves its weight gradient to ``store`` (a zero-bubble schedule's W
    pass): our tensor-parallel layers read their ``weight_grad_store``; HF's ``nn.Linear`` and GPT-2's
    ``Conv1D`` (Y = X W + b) get a forward through ``parallel.weight_grad.linear``."""
    for sub in module.modules():
        if hasattr(type(sub), "weight_grad_store"):
            sub.weight_grad_store = store  # type: ignore[assignment]  # torch's stub: Module attributes Tensor | Module only
        elif isinstance(sub, (nn.Linear, Conv1D)):
            sub.forward = partial(_deferring_forward, sub, store, isinstance(sub, Conv1D))  # type: ignore[method-assign]


def _deferring_forward(layer: nn.Linear | Conv1D, store: WeightGradStore, transposed: bool,
                       x: torch.Tensor) -> torch.Tensor:
    return linear(x, layer.weight, layer.bias, store, transposed)


def check_pipeline_fits(hf_config: PretrainedConfig, pipeline: int, virtual_stages: int, partition: str) -> None:
    """Raise ValueError for a pipeline split the model cannot take (before any model is built)."""
    if pipeline == 1:
        return
    if hf_config.model_type not in DECODERS:
        raise ValueError(f"parallel.pipeline={pipeline}: no pipeline stage split for model_type "
                         f"{hf_config.model_type!r} (have {sorted(DECODERS)})")
    layers = hf_config.num_hidden_layers
    _check_layer_types(hf_config, pipeline)
    chunks = pipeline * virtual_stages
    if virtual_stages > 1 and layers % chunks:
        raise ValueError(f"parallel.virtual_stages={virtual_stages} x parallel.pipeline={pipeline} = {chunks} "
                         f"chunks do not divide the model's {layers} layers")
    balanced_later = partition in ("parameters", "measured")  # balanced once the model exists: any cut fits
    stage_specs(layers, pipeline, virtual_stages, "uniform" if balanced_later else partition)


def _check_layer_types(hf_config: PretrainedConfig, pipeline: int) -> None:
    """Refuse blocks whose attention mask the chunks cannot rebuild. Beyond embeddings, positions, masks,
    rotary embeddings, blocks, norm and head, the forwards of the DECODERS architectures do nothing (rotary
    scaling lives in the rotary module, biases and attention options in the blocks)."""
    kinds = [DECODERS[hf_config.model_type].layer_type(hf_config, i) for i in range(hf_config.num_hidden_layers)]
    unknown = sorted(set(kinds) - set(MASKS))
    if unknown:
        where = [i for i, kind in enumerate(kinds) if kind not in MASKS]
        raise ValueError(f"parallel.pipeline={pipeline}: model config field layer_types with {unknown} (layers "
                         f"{where}) is not supported by the pipeline stage split, which rebuilds only the "
                         f"{sorted(MASKS)} masks; use parallel.pipeline=1, or add the mask to MASKS in "
                         f"modeling/pipeline.py")
