"""Shard an HF causal LM for tensor parallelism, compute its loss on vocabulary-parallel logits, and
merge the shards back into a full HF state dict."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from modeling.tp_plans import PLANS, check_tensor_parallel_fits
from parallel.comm import gather_from_tensor_parallel_region
from parallel.cross_entropy import causal_lm_loss, token_loss, vocab_parallel_cross_entropy
from parallel.layers import VocabParallelHead
from parallel.tp_plan import apply_tp_plan


def tensor_parallelize(model: nn.Module, tp_group, sequence_parallel: bool = False,
                       async_grad_reduce: bool = False) -> nn.Module:
    """Shard ``model`` in place over ``tp_group`` by its architecture's plan (no-op for one rank)."""
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    if world == 1:
        return model
    check_tensor_parallel_fits(model.config, world)
    return apply_tp_plan(model, PLANS[model.config.model_type], tp_group, sequence_parallel, async_grad_reduce)


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
    dim, chunks = param.partition_dim, param.tp_fused_chunks
    per_chunk = [s.chunk(chunks, dim=dim) for s in shards]
    full = torch.cat([torch.cat([p[c] for p in per_chunk], dim=dim) for c in range(chunks)], dim=dim)
    return full.narrow(dim, 0, param.tp_full_size)


def shard_of(model: nn.Module, name: str, full: torch.Tensor, tp_group) -> torch.Tensor:
    """The inverse of the merge in ``full_state_dict``: this rank's shard of ``name`` cut from the full
    HF-layout tensor ``full`` (transposed for Conv1D, zero-padded like a padded vocabulary, fused q|k|v
    blocks split per block). Unsharded tensors come back as they are."""
    tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    param = tensors[name]
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    if world == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    owner = model.get_submodule(name.rpartition(".")[0])
    if getattr(owner, "hf_conv1d", False) and full.dim() == 2:
        full = full.t()
    dim, rank = param.partition_dim, dist.get_rank(tp_group)
    padded = param.shape[dim] * world
    if full.shape[dim] < padded:
        pad_shape = list(full.shape)
        pad_shape[dim] = padded - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    pieces = [block.chunk(world, dim=dim)[rank] for block in full.chunk(param.tp_fused_chunks, dim=dim)]
    return torch.cat(pieces, dim=dim).contiguous()


def full_state_dict(model: nn.Module, tp_group, state: dict[str, torch.Tensor] | None = None):
    """The model's weights with every tensor-parallel shard gathered and merged, in the HF layout
    (Conv1D weights transposed back). Collective over ``tp_group``."""
    state = model.state_dict() if state is None else state
    params = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    merged = {}
    for name, tensor in state.items():
        param = params.get(name)
        if world == 1 or param is None or not getattr(param, "tensor_model_parallel", False):
            merged[name] = tensor
            continue
        shards = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(shards, tensor.contiguous(), group=tp_group)
        full = _merge(shards, param)
        owner = model.get_submodule(name.rpartition(".")[0])
        if getattr(owner, "hf_conv1d", False) and full.dim() == 2:
            full = full.t()
        merged[name] = full.contiguous()
    return merged
