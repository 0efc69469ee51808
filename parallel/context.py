"""Context parallelism: each rank of a context group of N holds 1/N of every sequence through the whole model.

The layout is the load-balanced one of Megatron and TorchTitan: the sequence of length s is cut into 2N equal
chunks and rank r holds chunks r and 2N-1-r (in that order), so under a causal mask every rank has the same
share of the attention's work. ``token_indices`` is the one rule for which tokens a rank holds; the input ids,
the position ids, the labels and the attention masks all follow it.

Attention needs every token's keys. Two ways, both exact:
- Ulysses (``ulysses_attention``, Jacobs et al. 2023, DeepSpeed-Ulysses): an all-to-all turns "all heads of s/N
  tokens" into "H/N heads of all s tokens", any attention kernel runs on the whole sequence of those heads, and
  the inverse all-to-all returns the output to the tokens' owners. Needs the head count divisible by N.
- Ring (``parallel.ring_attention``): key/value chunks travel around the group while each rank accumulates its
  queries' output blockwise; any head count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def token_indices(seq_len: int, rank: int, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Indices in the whole sequence of the ``seq_len / size`` tokens rank ``rank`` of ``size`` holds: chunks
    ``rank`` and ``2 size - 1 - rank`` of ``2 size`` equal chunks."""
    if seq_len % (2 * size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x context size {size}")
    chunk = seq_len // (2 * size)
    last = 2 * size - 1 - rank
    return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk, device=device),
                      torch.arange(last * chunk, (last + 1) * chunk, device=device)])


def rank_order(local_len: int, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The whole sequence's token indices in the order the group's ranks hold them (rank 0's, then rank 1's ...):
    ``gathered[:, natural] `` with ``natural = rank_order(...).argsort()`` puts a gathered sequence in order."""
    return torch.cat([token_indices(local_len * size, r, size, device) for r in range(size)])


class _AllToAll(torch.autograd.Function):
    """``x[j]`` goes to rank j of the group; ``out[i]`` came from rank i. Its gradient is the same exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.group), None


def _exchange(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    x = x.contiguous()  # empty_like keeps a permuted tensor's strides; the collective writes densely
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def heads_to_sequence(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """[b, h, s/N, d] (all heads of this rank's tokens) -> [b, h/N, s, d] (head group r of every token, in the
    sequence's natural order), r this rank's index in ``group``."""
    size = group_size(group)
    b, h, local, d = x.shape
    parts = x.reshape(b, size, h // size, local, d).transpose(0, 1)   # [dest rank, b, h/N, s/N, d]
    received = _AllToAll.apply(parts, group)                          # [source rank, b, h/N, s/N, d]
    gathered = received.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * local, d)
    natural = rank_order(local, size, x.device).argsort()
    return gathered.index_select(2, natural)


def sequence_to_heads(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """The inverse of ``heads_to_sequence`` for an output laid out [b, s, h/N, d] (as HF attention functions
    return it): -> [b, s/N, h, d], this rank's tokens with every head."""
    size = group_size(group)
    b, seq, heads, d = x.shape
    local = seq // size
    ordered = x.index_select(1, rank_order(local, size, x.device))
    parts = ordered.reshape(b, size, local, heads, d).transpose(0, 1)  # [dest rank, b, s/N, h/N, d]
    received = _AllToAll.apply(parts, group)                           # [source head group, b, s/N, h/N, d]
    return received.permute(1, 2, 0, 3, 4).reshape(b, local, size * heads, d)


def ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: ProcessGroup | None,
                      attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Attention over the whole sequence of the group by all-to-all over heads. ``query`` [b, h, s/N, d],
    ``key``/``value`` [b, kv, s/N, d] (this rank's tokens); ``attend(q, k, v)`` runs on [b, h/N, s, d] in natural
    order and returns [b, s, h/N, d]. Key/value heads fewer than N are repeated to N (each rank then holds the
    one its query heads use). Returns [b, s/N, h, d]."""
    size = group_size(group)
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % size or (kv_heads % size and size % kv_heads):
        raise ValueError(f"{heads} query / {kv_heads} key-value heads per rank cannot be split over a context "
                         f"group of {size} by all-to-all: use ring attention")
    if kv_heads % size:
        key, value = (t.repeat_interleave(size // kv_heads, dim=1) for t in (key, value))
    q, k, v = (heads_to_sequence(t, group) for t in (query, key, value))
    return sequence_to_heads(attend(q, k, v), group)


def local_tokens(input_ids: torch.Tensor, labels: torch.Tensor, group: ProcessGroup | None,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's part of a batch of whole sequences: (its input ids, their position ids — ``positions``' or
    their places in the sequence —, the next-token target of each: ``labels`` shifted by one in the whole
    sequence, -100 after the last token), each [b, s/N]."""
    size = group_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    index = token_indices(input_ids.shape[1], rank, size, input_ids.device)
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
    local_positions = index.expand(input_ids.shape[0], -1) if positions is None else positions[:, index]
    return input_ids[:, index], local_positions, targets[:, index]


def document_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids that restart after every ``eos_id`` (each packed document counted from 0), [b, s]."""
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def gather_sequence(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """[b, s/N] values of this rank's tokens (no gradient) -> [b, s], every token's, in natural order."""
    size = group_size(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    natural = rank_order(x.shape[1], size, x.device).argsort()
    return torch.cat(parts, dim=1).index_select(1, natural)
