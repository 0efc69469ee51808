"""Exact ring attention for context parallelism (Liu et al., "Ring Attention"; the algorithm of TorchTitan's
``torch.distributed.tensor.experimental._attention`` and Megatron's context parallelism).

Each of the N ranks of the context-parallel group holds some tokens of the sequence (any subset, in any order,
e.g. chunks r and 2N-1-r of 2N for balance): their queries Q, keys K and values V, and the tokens' positions.
The output for this rank's queries is attention over every rank's keys::

    Y = softmax(scaling * Q K^T + M) V,   M[i, j] = 0 where key j is visible to query i, else -inf

visible: ``k_index <= q_index``, ``q_index - k_index < sliding_window`` (when given, Hugging Face's rule) and
``q_doc == k_doc`` (when given). Scores are computed in fp32 (or the input's dtype when wider).

Ring order: at step s = 0..N-1 rank r holds the key/value block of rank (r - s) mod N; it posts the send of
that block to rank r+1 and the receive of the next one from rank r-1 before computing the current block, so
the transfer overlaps the compute. Blocks are merged by their log-sum-exp (online softmax): a block b with
normalised output Y_b and L_b = log sum_j exp(S_j) over its visible keys merges as::

    L = log(exp(L_a) + exp(L_b)),   Y = exp(L_a - L) Y_a + exp(L_b - L) Y_b

A row that sees no key of a block has L_b = -inf and weight 0 (never NaN). The forward keeps Q, K, V, Y and L.
Each block is computed for ``tile`` query rows at a time, so the score matrix held at once is at most
batch x heads x tile x (the block's keys), whatever the sequence length.

Backward, with D = rowsum(dY * Y) and per block P = exp(scaling * Q K^T - L) (0 where masked)::

    dV_b = P^T dY,  dP = dY V^T,  dS = P * (dP - D),  dQ += scaling * dS K,  dK_b = scaling * dS^T Q

The key/value blocks go round the ring as in the forward, and each block's dK/dV accumulator travels with it
(posted after the block's compute); after N steps rank r holds block r+1's complete gradient, and one last
send delivers it to its owner. Grouped-query attention: query head i uses key/value head i // (q_heads //
kv_heads); dK/dV sum over the query heads of a group. Accumulators are kept (and sent) in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

_NEG_INF = float("-inf")
QUERY_TILE = 1024  # query rows per score matrix: a block's scores never exceed batch x heads x 1024 x its keys


class _Transfer:
    """Posted sends and receives; ``wait`` returns the received tensors."""

    def __init__(self, sends: list[torch.Tensor], received: list[torch.Tensor], works: list):
        self.sends, self.received, self.works = sends, received, works  # sends stay alive until complete

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            work.wait()
        self.sends = []
        return self.received


class _Ring:
    """This rank's neighbours in ``group``: it sends to the next rank and receives from the previous one."""

    def __init__(self, group: ProcessGroup | None):
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        if group is not None and self.size > 1:
            rank = dist.get_rank(group)
            self.next = dist.get_global_rank(group, (rank + 1) % self.size)
            self.prev = dist.get_global_rank(group, (rank - 1) % self.size)

    def start(self, tensors: list[torch.Tensor]) -> _Transfer:
        """Send ``tensors`` to the next rank and receive as many of the same shapes from the previous one."""
        sends = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sends]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in received]
        return _Transfer(sends, received, dist.batch_isend_irecv(ops))


def _visible(q_index, k_index, q_doc, k_doc, window) -> torch.Tensor:
    """[batch, 1, 1, q, k] boolean: which keys each query sees."""
    qi, ki = q_index[:, :, None], k_index[:, None, :]
    mask = ki <= qi
    if window is not None:
        mask = mask & (qi - ki < window)
    if q_doc is not None:
        mask = mask & (q_doc[:, :, None] == k_doc[:, None, :])
    return mask[:, None, None]


def _scores(q5, block, q_index, q_doc, scaling, window):
    """Scaled scores [batch, kv_heads, group, q, k] of the grouped queries against a block, and its mask."""
    key, k_index = block[0], block[2]
    k_doc = block[3] if len(block) > 3 else None
    scores = scaling * (q5 @ key.to(q5.dtype).unsqueeze(2).transpose(-1, -2))
    return scores, _visible(q_index, k_index, q_doc, k_doc, window)


def _block_forward(q5, block, q_index, q_doc, scaling, window):
    """Normalised output and log-sum-exp of the queries over one key/value block (-inf where none is visible)."""
    scores, mask = _scores(q5, block, q_index, q_doc, scaling, window)
    scores = scores.masked_fill(~mask, _NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(lse == _NEG_INF, 0.0, lse)[..., None])
    return probs @ block[1].to(q5.dtype).unsqueeze(2), lse


def _merge(out, lse, blk_out, blk_lse):
    new = torch.logaddexp(lse, blk_lse)
    seen = new > _NEG_INF
    w_old = torch.where(seen, torch.exp(lse - new), 0.0)[..., None]
    w_new = torch.where(seen, torch.exp(blk_lse - new), 0.0)[..., None]
    return out * w_old + blk_out * w_new, new


def _block_backward(q5, do5, delta, lse, block, q_index, q_doc, scaling, window):
    """Gradient contributions (dq, dk, dv) of one key/value block, dk/dv summed over each kv group's heads."""
    scores, mask = _scores(q5, block, q_index, q_doc, scaling, window)
    probs = torch.where(mask, torch.exp(scores - lse[..., None]), 0.0)
    key, value = block[0].to(q5.dtype).unsqueeze(2), block[1].to(q5.dtype).unsqueeze(2)
    dv = (probs.transpose(-1, -2) @ do5).sum(2)
    ds = probs * (do5 @ value.transpose(-1, -2) - delta[..., None])
    dq = scaling * (ds @ key)
    dk = scaling * (ds.transpose(-1, -2) @ q5).sum(2)
    return dq, dk, dv


def _grouped(x: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch, q_heads, s, d] -> [batch, kv_heads, q_heads // kv_heads, s, d] in ``dtype``."""
    b, h, s, d = x.shape
    return x.to(dtype).reshape(b, kv_heads, h // kv_heads, s, d)


def _tiles(rows: slice, tile: int) -> list[slice]:
    return [slice(start, min(start + tile, rows.stop)) for start in range(rows.start, rows.stop, tile)]


def _live(balanced: int | None, ring: _Ring, step: int, length: int) -> tuple[slice, slice]:
    """(query rows, key columns) of the block held at ``step`` that a causal mask leaves visible. With
    ``balanced`` (this rank's index r in the group, tokens in the balanced layout: chunks r and 2N-1-r), the
    block of rank j < r is seen only through its first chunk, and that of j > r only by the second query chunk;
    otherwise everything is computed."""
    every = slice(0, length)
    if balanced is None or step == 0:
        return every, every
    source, half = (balanced - step) % ring.size, length // 2
    return (every, slice(0, half)) if source < balanced else (slice(half, length), every)


def _part(block: list[torch.Tensor], cols: slice) -> list[torch.Tensor]:
    """The key columns ``cols`` of a block [key, value, k_index, (k_doc)]."""
    return [t[:, :, cols] for t in block[:2]] + [t[:, cols] for t in block[2:]]


def _rows(doc: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if doc is None else doc[:, rows]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, q_index, k_index, group, scaling, window, q_doc, k_doc, tile, balanced):
        ring, dtype = _Ring(group), torch.promote_types(query.dtype, torch.float32)
        q5 = _grouped(query, key.shape[1], dtype)
        block = [key, value, k_index] + ([k_doc] if k_doc is not None else [])
        out = torch.zeros_like(q5)
        lse = torch.full(q5.shape[:-1], _NEG_INF, dtype=dtype, device=query.device)
        for step in range(ring.size):
            transfer = ring.start(block) if step + 1 < ring.size else None
            rows, cols = _live(balanced, ring, step, q5.shape[3])
            for t in _tiles(rows, tile):
                blk_out, blk_lse = _block_forward(q5[..., t, :], _part(block, cols), q_index[:, t], _rows(q_doc, t),
                                                  scaling, window)
                out[..., t, :], lse[..., t] = _merge(out[..., t, :], lse[..., t], blk_out, blk_lse)
            if transfer is not None:
                block = transfer.wait()
        out = out.reshape(query.shape).to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse, q_index, k_index, q_doc, k_doc)
        ctx.ring, ctx.scaling, ctx.window, ctx.tile, ctx.balanced = ring, scaling, window, tile, balanced
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, out, lse, q_index, k_index, q_doc, k_doc = ctx.saved_tensors
        ring, dtype, kv_heads = ctx.ring, lse.dtype, key.shape[1]
        q5, do5 = _grouped(query, kv_heads, dtype), _grouped(dout, kv_heads, dtype)
        delta = (do5 * _grouped(out, kv_heads, dtype)).sum(-1)
        block = [key, value, k_index] + ([k_doc] if k_doc is not None else [])
        dq = torch.zeros_like(q5)
        grads: _Transfer | None = None  # the dk/dv accumulators of the block held next
        for step in range(ring.size):
            transfer = ring.start(block) if step + 1 < ring.size else None
            dk, dv = torch.zeros_like(block[0], dtype=dtype), torch.zeros_like(block[1], dtype=dtype)
            rows, cols = _live(ctx.balanced, ring, step, q5.shape[3])
            for t in _tiles(rows, ctx.tile):
                dq_blk, dk_blk, dv_blk = _block_backward(q5[..., t, :], do5[..., t, :], delta[..., t], lse[..., t],
                                                         _part(block, cols), q_index[:, t], _rows(q_doc, t),
                                                         ctx.scaling, ctx.window)
                dq[..., t, :] += dq_blk
                dk[:, :, cols] += dk_blk
                dv[:, :, cols] += dv_blk
            if grads is not None:
                dk_in, dv_in = grads.wait()
                dk, dv = dk + dk_in, dv + dv_in
            if ring.size > 1:  # on to the next holder; after the last step, to the block's owner
                grads = ring.start([dk, dv])
            if transfer is not None:
                block = transfer.wait()
        if grads is not None:
            dk, dv = grads.wait()
        return (dq.reshape(query.shape).to(query.dtype), dk.to(key.dtype), dv.to(value.dtype),
                None, None, None, None, None, None, None, None, None)


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   q_index: torch.Tensor, k_index: torch.Tensor, group: ProcessGroup | None,
                   scaling: float, sliding_window: int | None = None,
                   q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None,
                   tile: int = QUERY_TILE, balanced: int | None = None) -> torch.Tensor:
    """Causal attention of this rank's queries over the keys/values of every rank of ``group`` (module doc).

    ``query`` [batch, q_heads, s, head_dim]; ``key``, ``value`` [batch, kv_heads, s, head_dim] with q_heads a
    multiple of kv_heads; ``q_index``, ``k_index`` int64 [batch, s]: each token's position in the full sequence;
    ``group``: the context-parallel group (None or one rank: local attention); ``scaling`` multiplies q k^T;
    ``sliding_window``: a key is visible while q_index - k_index < sliding_window; ``q_doc``, ``k_doc``: int64
    [batch, s] document ids, a key visible only within its document (both or neither); ``tile``: query rows
    per score matrix; ``balanced``: this rank's index in ``group`` when its tokens are the balanced layout's
    (chunks r and 2N-1-r of 2N, ``parallel.context.token_indices``): the blocks' causally masked halves are then
    not computed (about half the score work). Every rank of the group
    calls this with the same shapes. Returns [batch, q_heads, s, head_dim] in ``query``'s dtype."""
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} key/value heads")
    if (q_doc is None) != (k_doc is None):
        raise ValueError("q_doc and k_doc are given together or not at all")
    out = _RingAttention.apply(query, key, value, q_index, k_index, group, scaling, sliding_window, q_doc, k_doc,
                               tile, balanced)
    assert isinstance(out, torch.Tensor)
    return out
