"""The next token from vocabulary-parallel logits, without any rank holding (or sending) the whole vocabulary.

Each tensor-parallel rank holds the logits of vocabulary rows ``[start, start + local)``, the first ``valid`` of
them real (the rest pad a vocabulary the group does not divide). The choice follows Hugging Face's processor
order: repetition penalty, suppressed tokens, temperature, top-k, top-p, then the pick:

- greedy: each rank's (max, index); an all-gather of those pairs; the best value wins, the lowest index on a tie
  (``torch.argmax``'s rule, so one process and any layout pick alike);
- sampling: Gumbel-max, ``argmax(logits / T + g)`` with ``g = -log(-log(u))`` an exact draw from the filtered
  softmax; ``u`` comes from a counter-based hash of (seed, request, position, vocabulary index), so a request's
  tokens do not depend on the layout, the batch it shares or the order requests run in.

Top-k: each rank's k best, all-gathered (k values per rank), give the k-th value. Top-p: the threshold is found
by bisection over the float32 values' order (32 rounds of one all-reduce of a value per row), keeping the tokens
whose ascending cumulative mass exceeds 1 - p, as Hugging Face's ``TopPLogitsWarper`` does (ties at the
threshold are kept together). Messages are a few values per row; the tensors are on the logits' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from parallel.comm import all_reduce


@dataclass(frozen=True)
class Decoding:
    """How the next token is chosen. ``temperature`` 0 is greedy (top-k / top-p then unused)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's logits sit in the vocabulary; ``group`` None when one rank holds it all."""

    start: int
    valid: int
    group: ProcessGroup | None = None


def _world(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_gather(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """``[world, *x.shape]``: every rank's ``x``."""
    world = _world(group)
    if world == 1:
        return x.unsqueeze(0)
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out.view(world, *x.shape)


# --- processors (elementwise on the shard, as HF's) -------------------------------------------------------
def mask_padding(logits: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """float32 logits with the padding rows at -inf."""
    logits = logits.float()
    if shard.valid < logits.shape[-1]:
        logits = logits.clone()
        logits[..., shard.valid:] = float("-inf")
    return logits


def penalize_repetition(logits: torch.Tensor, shard: VocabShard, history: torch.Tensor, penalty: float
                        ) -> torch.Tensor:
    """HF's ``RepetitionPenaltyLogitsProcessor`` on the shard: the logit of every token in ``history`` ([B, T];
    negative entries are padding) is divided by ``penalty`` when positive, multiplied when negative."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    local = history - shard.start
    inside = (history >= 0) & (local >= 0) & (local < logits.shape[-1])
    local = local.clamp(0, logits.shape[-1] - 1)
    seen = logits.gather(-1, local)
    penalized = torch.where(seen < 0, seen * penalty, seen / penalty)
    # rows' outside entries rewrite the logit they point at with its own value (a no-op)
    return logits.scatter(-1, local, torch.where(inside, penalized, seen))


def top_k_filter(logits: torch.Tensor, k: int, group: ProcessGroup | None) -> torch.Tensor:
    """Tokens below the k-th largest logit of the whole vocabulary set to -inf (ties with it kept)."""
    local = logits.topk(min(k, logits.shape[-1]), dim=-1).values          # [B, k_local]
    gathered = _all_gather(local, group)                                   # [world, B, k_local]
    candidates = gathered.permute(1, 0, 2).reshape(logits.shape[0], -1)
    threshold = candidates.topk(min(k, candidates.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def _order_key(values: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as the float32 ``values`` are (an involution with ``_from_key``)."""
    bits = values.float().contiguous().view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _from_key(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where(keys < 0, keys ^ 0x7FFFFFFF, keys)
    return bits.to(torch.int32).view(torch.float32)


def top_p_filter(logits: torch.Tensor, p: float, group: ProcessGroup | None) -> torch.Tensor:
    """Keep the tokens whose ascending cumulative probability exceeds ``1 - p`` (HF's ``TopPLogitsWarper``; the
    most likely token always stays). Bisection over the float32 order for the smallest kept value: ``mass(v)``,
    the probability of the logits <= v, is one all-reduce of a float64 per row."""
    top = all_reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
    weights = torch.exp(logits.double() - top.double().unsqueeze(-1))
    total = all_reduce(weights.sum(-1), group)
    below = (1.0 - p) * total                      # mass(v) > below <=> v is kept
    low = _order_key(torch.full_like(top, float("-inf")))   # mass(low) <= below
    high = _order_key(top)                                  # mass(high) = total > below
    for _ in range(33):                                     # the keys span 2^32 values: the interval closes
        middle = (low + high) // 2
        value = _from_key(middle).unsqueeze(-1)
        mass = all_reduce(torch.where(logits <= value, weights, 0.0).sum(-1), group)
        kept = mass > below
        high, low = torch.where(kept, middle, high), torch.where(kept, low, middle)
    return logits.masked_fill(logits < _from_key(high).unsqueeze(-1), float("-inf"))


# --- counter-based noise ----------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (two's-complement wrap-around, as on every torch device)."""
    z = z + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def uniform_noise(seed: int, requests: torch.Tensor, positions: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """float64 in (0, 1) for each (request, position) row [B] and vocabulary index [V]: [B, V], a pure function
    of the four numbers."""
    key = splitmix64(torch.full_like(requests, _signed(seed & _MASK64)))
    key = splitmix64(key ^ requests)
    key = splitmix64(key ^ positions).unsqueeze(-1)
    bits = splitmix64(key ^ vocab.unsqueeze(0))
    return (_shift_right(bits, 11).double() + 0.5) * 2.0 ** -53


# --- the pick ---------------------------------------------------------------------------------------------
def vocab_parallel_argmax(scores: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The vocabulary index of each row's largest score over all shards (the lowest index among equal ones)."""
    index = scores.argmax(dim=-1)
    value = scores.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    pairs = torch.stack([value.double(), (index + shard.start).double()], dim=-1)     # [B, 2]
    gathered = _all_gather(pairs, shard.group)                                         # [world, B, 2]
    best = gathered[..., 0].argmax(dim=0, keepdim=True)                                # first rank wins ties
    return gathered[..., 1].gather(0, best).squeeze(0).long()


def choose(logits: torch.Tensor, shard: VocabShard, decoding: Decoding, requests: torch.Tensor,
           positions: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` ([B, local]) under ``decoding``: ``requests`` and ``positions``
    ([B] int64) key the sampling noise; ``history`` ([B, T], -1 for padding) is what the repetition penalty
    sees. Collective over ``shard.group``; returns [B] int64 on every rank of it."""
    logits = mask_padding(logits, shard)
    if history is not None:
        logits = penalize_repetition(logits, shard, history, decoding.repetition_penalty)
    if decoding.greedy:
        return vocab_parallel_argmax(logits, shard)
    logits = logits / decoding.temperature
    if decoding.top_k > 0:
        logits = top_k_filter(logits, decoding.top_k, shard.group)
    if decoding.top_p < 1.0:
        logits = top_p_filter(logits, decoding.top_p, shard.group)
    vocab = torch.arange(shard.start, shard.start + logits.shape[-1], device=logits.device)
    noise = uniform_noise(decoding.seed, requests, positions, vocab)
    return vocab_parallel_argmax(logits.double() - torch.log(-torch.log(noise)), shard)
