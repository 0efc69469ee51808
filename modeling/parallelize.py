"""Shard an HF causal LM for tensor parallelism, compute its loss on vocabulary-parallel logits, and
merge the shards back into a full HF state dict."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from modeling.tp_plans import PLANS, check_tensor_parallel_fits
from parallel.comm import comm_device, gather_from_tensor_parallel_region
from parallel.cross_entropy import causal_lm_loss, token_loss, vocab_parallel_cross_entropy
from parallel.layers import VocabParallelHead, join_pieces, shard_ranges
from parallel.random import TensorParallelRNG
from parallel.random import install as install_dropout_rng
from parallel.tp_plan import apply_tp_plan


def tensor_parallelize(model: nn.Module, tp_group, sequence_parallel: bool = False,
                       async_grad_reduce: bool = False, dropout_seed: int | None = None) -> nn.Module:
    """Shard ``model`` in place over ``tp_group`` by its architecture's plan (no-op for one rank). With
    ``dropout_seed``, dropout on split data draws from this rank's own generator (``parallel.random``), kept
    in ``model.tensor_parallel_rng`` for the checkpoints and the recomputation."""
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    if world == 1:
        return model
    check_tensor_parallel_fits(model.config, world)
    plan = PLANS[model.config.model_type]
    apply_tp_plan(model, plan, tp_group, sequence_parallel, async_grad_reduce)
    if dropout_seed is not None:
        rng = TensorParallelRNG(dropout_seed, dist.get_rank(tp_group), comm_device(tp_group))
        blocks = model.get_submodule(plan.blocks) if sequence_parallel else None  # decoders only, as SP
        install_dropout_rng(model, rng, blocks)
        model.tensor_parallel_rng = rng
    return model


def vocab_slice(head: nn.Module) -> tuple[int, int | None]:
    """(first vocabulary row, number of real rows) of this rank's logits; (0, None) when unsharded."""
    if isinstance(head, VocabParallelHead):
        return head.vocab_start, head.valid_rows
    return 0, None


def lm_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """Mean next-token loss from the model's (possibly vocabulary-sharded) logits."""
    start, valid = vocab_slice(model.get_output_embeddings())
    return causal_lm_loss(logits, labels, tp_group if valid is not None else None, start, valid)


def seq2seq_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """Mean loss of the decoder's labels (no shift; -100 = padding) from (possibly sharded) logits."""
    start, valid = vocab_slice(model.get_output_embeddings())
    return token_loss(logits, labels, tp_group if valid is not None else None, start, valid)


def full_logits(model: nn.Module, logits: torch.Tensor, tp_group) -> torch.Tensor:
    """The logits over the whole vocabulary on every rank (gathered from the shards, padding dropped)."""
    head = model.get_output_embeddings()
    if not isinstance(head, VocabParallelHead):
        return logits
    return gather_from_tensor_parallel_region(logits, tp_group)[..., :head.vocab_size]


@torch.no_grad()
def generate(model: nn.Module, tp_group, **kwargs) -> torch.Tensor:
    """``model.generate(**kwargs)`` through a tensor-parallel model: its logits are gathered after the
    forward (after any vocabulary bias), so every rank scores the whole vocabulary and picks the same
    tokens, greedy or beam search. Collective over ``tp_group``."""
    def gather(module, args, output):
        output["logits"] = full_logits(model, output["logits"], tp_group)
        return output

    handle = model.register_forward_hook(gather)
    try:
        return model.generate(**kwargs)
    finally:
        handle.remove()


def next_token_losses(model: nn.Module, logits: torch.Tensor, input_ids: torch.Tensor, tp_group) -> torch.Tensor:
    """Per-token NLL of ``input_ids[:, 1:]`` given the logits before them, shape (batch, seq - 1)."""
    head = model.get_output_embeddings()
    if isinstance(head, VocabParallelHead):
        return vocab_parallel_cross_entropy(logits[:, :-1], input_ids[:, 1:], tp_group, head.vocab_start,
                                            head.valid_rows)
    return vocab_parallel_cross_entropy(logits[:, :-1], input_ids[:, 1:])


def _merge(shards: list[torch.Tensor], param) -> torch.Tensor:
    """The full tensor from every tensor-parallel rank's shard (in rank order), placed by ``shard_ranges``."""
    dim, world, size = param.partition_dim, len(shards), param.tp_full_size
    shape = list(shards[0].shape)
    shape[dim] = size
    full = shards[0].new_empty(shape)
    for rank, shard in enumerate(shards):
        ranges, _ = shard_ranges(size, rank, world, param.tp_fused_chunks, shard.shape[dim] * world)
        offset = 0
        for start, stop in ranges:
            full.narrow(dim, start, stop - start).copy_(shard.narrow(dim, offset, stop - start))
            offset += stop - start
    return full


@dataclass(frozen=True)
class Shard:
    """Where this rank's tensor lies in the full tensor of the HF layout: along ``dim`` the ``ranges`` of the
    full tensor, concatenated, then zeros up to ``size`` (a padded vocabulary); ``dim`` None: held whole.
    ``transposed``: the rank holds it transposed (transformers' Conv1D stores (in, out), our layers (out, in))."""

    dim: int | None
    ranges: tuple[tuple[int, int], ...] = ()
    size: int = 0
    transposed: bool = False

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor, in this rank's layout (a copy)."""
        if self.dim is None:
            return full
        return self._assemble([full.narrow(self.dim, a, b - a) for a, b in self.ranges])

    def read(self, stored, full_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """This rank's part read from a ``safe_open(...).get_slice(name)`` (only the bytes it keeps), as ``dtype``."""
        if self.dim is None:
            return stored[tuple(slice(None) for _ in full_shape)].to(dtype)
        lead = (slice(None),) * self.dim
        return self._assemble([stored[lead + (slice(a, b),)].to(dtype) for a, b in self.ranges])

    def _assemble(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        local = join_pieces(pieces, self.dim, self.size)
        return local.t().contiguous() if self.transposed else local


def shard_for(tensor: torch.Tensor, hf_conv1d: bool, tp_group) -> Shard:
    """The ``Shard`` of a parameter or buffer of a tensor-parallel model (``parallel.layers.shard_ranges``)."""
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    if world == 1 or not getattr(tensor, "tensor_model_parallel", False):
        return Shard(None)
    dim = tensor.partition_dim
    shape = getattr(tensor, "ds_shape", tensor.shape)  # ZeRO-3 keeps a flat partition, its real shape there
    transposed = hf_conv1d and len(shape) == 2
    local_size = shape[dim]
    ranges, size = shard_ranges(tensor.tp_full_size, dist.get_rank(tp_group), world, tensor.tp_fused_chunks,
                                local_size * world)
    return Shard(1 - dim if transposed else dim, tuple(ranges), size, transposed)


def shards(model: nn.Module, tp_group) -> dict[str, Shard]:
    """Every parameter's and persistent buffer's ``Shard``, by HF name (tied weights under each name)."""
    return {name: shard_for(tensor, getattr(_owner(model, name), "hf_conv1d", False), tp_group)
            for name, tensor in _tensors(model).items()}


def _owner(model: nn.Module, name: str) -> nn.Module:
    parent = name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def shard_of(model: nn.Module, name: str, full: torch.Tensor, tp_group) -> torch.Tensor:
    """This rank's shard of ``name`` cut from the full HF-layout tensor ``full``; the inverse of the merge in
    ``full_state_dict``. Unsharded tensors come back as they are."""
    hf_conv1d = getattr(_owner(model, name), "hf_conv1d", False)
    return shard_for(_tensors(model)[name], hf_conv1d, tp_group).cut(full)


def full_state_dict(model: nn.Module, tp_group, state: dict[str, torch.Tensor] | None = None):
    """The model's weights with every tensor-parallel shard gathered and merged, in the HF layout
    (Conv1D weights transposed back). Collective over ``tp_group``."""
    state = model.state_dict() if state is None else state
    return {name: full_tensor(model, name, tensor, tp_group) for name, tensor in state.items()}


def full_tensor(model: nn.Module, name: str, tensor: torch.Tensor, tp_group) -> torch.Tensor:
    """The full HF-layout tensor of ``name`` from this rank's ``tensor`` (its shard, or a value in its layout,
    e.g. a gradient): tensor-parallel shards gathered and merged, Conv1D transposed back. Collective over
    ``tp_group`` for a sharded parameter."""
    param = _tensors(model).get(name)
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    if world == 1 or param is None or not getattr(param, "tensor_model_parallel", False):
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(shards, tensor.contiguous(), group=tp_group)
    full = _merge(shards, param)
    if getattr(_owner(model, name), "hf_conv1d", False) and full.dim() == 2:
        full = full.t()
    return full.contiguous()


def full_shape(model: nn.Module, name: str, tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape ``full_tensor`` returns for this rank's ``tensor`` of ``name`` (no communication)."""
    shape = list(getattr(tensor, "ds_shape", tensor.shape))  # ZeRO-3 keeps the unpartitioned shape there
    if getattr(tensor, "tensor_model_parallel", False):
        shape[tensor.partition_dim] = tensor.tp_full_size
        if getattr(_owner(model, name), "hf_conv1d", False) and len(shape) == 2:
            shape.reverse()
    return tuple(shape)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
