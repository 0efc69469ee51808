"""The output layer and its cross entropy in blocks of tokens x vocabulary rows, never holding the full
(tokens x vocabulary) logits: ``loss[i] = logsumexp(z[i]) - z[i, target[i]]`` with ``z = f(hidden @ W^T + b)``.

The forward keeps for the backward only the hidden states, the weight (and bias), the targets and the
per-token log-sum-exp; the backward recomputes each block's logits and adds its part of the hidden states'
and the weight's gradients. Blocks: ``chunk_tokens`` tokens (``parallel.loss_chunk_tokens``) by at most
``SLAB_ROWS`` vocabulary rows, so a block's fp32 logits stay bounded whatever the vocabulary.

Under tensor parallelism ``weight`` holds this rank's vocabulary rows ``[vocab_start, vocab_start + local)``,
of which the first ``valid`` are real (the rest pad a vocabulary the group does not divide: never used, their
gradient 0). As ``parallel.cross_entropy``: three all-reduces of (tokens,)-sized tensors over the group, the
maximum, the sum of exponentials and the target logit; the backward needs none (the hidden states' gradient is
reduced by the region the caller entered). ``f``: ``softcap * tanh(scale * z / softcap)`` or ``scale * z``
(Gemma's final-logit soft-capping, Cohere's and Granite's logit scales), its gradient included.

Precision: each block's logits are computed in the weight's dtype (as the unchunked layer computes them) and
taken to fp32; the gradients of a block are cast to that dtype for the two GEMMs, as the unchunked backward
casts its logits' gradient. Sums over blocks are fp32 (the hidden states' over vocabulary slabs, the weight's
over token chunks, one slab-sized buffer at a time) and rounded to the parameters' dtype once: in fp32 the
result is the unchunked one up to summation order; in bf16 one bf16 rounding per block's partial product apart
(a bf16 running sum would round once per chunk and drift with the number of chunks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from parallel.comm import all_reduce

SLAB_ROWS = 32_768  # vocabulary rows per block: 1,024 tokens x 32,768 rows = 128 MiB of fp32 logits


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the loss's arithmetic: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _spans(total: int, step: int) -> list[tuple[int, int]]:
    return [(begin, min(begin + step, total)) for begin in range(0, total, max(1, step))]


# --- numerics (no communication) -------------------------------------------------------------------
def _block_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
                  softcap: float | None) -> torch.Tensor:
    """fp32 ``f(x @ weight^T + bias)`` of one block (a fresh tensor: callers work in place)."""
    z = F.linear(x, weight, bias)
    z = z.to(_wide(z.dtype))
    if scale != 1.0:
        z.mul_(scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _local_targets(targets: torch.Tensor, first: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets as rows of a block whose first vocabulary row is ``first``, 0 where outside; which are inside)."""
    local = targets - first
    inside = (local >= 0) & (local < rows)
    return local.masked_fill(~inside, 0), inside


def _local_statistics(x, weight, bias, targets, first_row, valid, chunk, slab, scale, softcap):
    """Over this rank's ``valid`` rows: each token's max logit, sum of exp(logit - that max), target logit (0
    where the target is another rank's)."""
    n, wide = x.shape[0], _wide(x.dtype)
    top = torch.full((n,), float("-inf"), dtype=wide, device=x.device)
    sums = torch.zeros(n, dtype=wide, device=x.device)
    target_logit = torch.zeros(n, dtype=wide, device=x.device)
    for r0, r1 in _spans(valid, slab):
        w, b = weight[r0:r1], None if bias is None else bias[r0:r1]
        for c0, c1 in _spans(n, chunk):
            z = _block_logits(x[c0:c1], w, b, scale, softcap)
            local, inside = _local_targets(targets[c0:c1], first_row + r0, r1 - r0)
            target_logit[c0:c1] += z.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill(~inside, 0.0)
            new_top = torch.maximum(top[c0:c1], z.max(dim=1).values)
            rescaled = sums[c0:c1] * torch.exp(top[c0:c1] - new_top)
            sums[c0:c1] = rescaled + z.sub_(new_top.unsqueeze(1)).exp_().sum(dim=1)
            top[c0:c1] = new_top
    return top, sums, target_logit


def _block_grad(z: torch.Tensor, lse: torch.Tensor, local: torch.Tensor, inside: torch.Tensor,
                grad: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """d loss / d (x W^T + b) of one block, in place on its logits ``z``: (softmax - one-hot) x grad x f'."""
    slope = None
    if softcap is not None:  # d/dz softcap * tanh(scale * z / softcap) = scale * (1 - tanh^2)
        slope = (z / softcap).square_().neg_().add_(1.0).mul_(scale)
    p = z.sub_(lse.unsqueeze(1)).exp_()
    p.scatter_add_(1, local.unsqueeze(1), -inside.to(p.dtype).unsqueeze(1))
    p.mul_(grad.unsqueeze(1))
    if slope is not None:
        p.mul_(slope)
    elif scale != 1.0:
        p.mul_(scale)
    return p


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` in fp32 ``out``: in place when ``a`` and ``b`` are fp32, else their product in their
    dtype (fp32 accumulation inside the GEMM), added."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, group, vocab_start, valid, chunk, slab, scale, softcap, ignore_index):
        ignored = targets == ignore_index
        targets = targets.masked_fill(ignored, -1)  # below every rank's rows: no target logit anywhere
        top, sums, target_logit = _local_statistics(x, weight, bias, targets, vocab_start, valid, chunk, slab,
                                                    scale, softcap)
        # --- communication: as _VocabParallelCrossEntropy, the max, the sum of exponentials, the target logit
        top_all = all_reduce(top.clone(), group, dist.ReduceOp.MAX)
        sums = all_reduce(sums * torch.exp(top - top_all), group)  # a rank without rows: 0 * exp(-inf) = 0
        target_logit = all_reduce(target_logit, group)
        lse = top_all + sums.log()
        ctx.save_for_backward(x, weight, bias, targets, lse, ignored)
        ctx.settings = (vocab_start, valid, chunk, slab, scale, softcap)
        return (lse - target_logit).masked_fill(ignored, 0.0)

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, bias, targets, lse, ignored = ctx.saved_tensors
        vocab_start, valid, chunk, slab, scale, softcap = ctx.settings
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        wide = _wide(x.dtype)
        grad = grad_loss.to(wide).masked_fill(ignored, 0.0)
        grad_x = torch.zeros(x.shape, dtype=wide, device=x.device) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=wide, device=x.device) if need_b else None
        for r0, r1 in _spans(valid, slab):
            w, b = weight[r0:r1], None if bias is None else bias[r0:r1]
            in_place = grad_w is not None and grad_w.dtype == wide
            slab_grad = grad_w[r0:r1] if in_place else (  # type: ignore[index]
                torch.zeros(w.shape, dtype=wide, device=w.device) if need_w else None)
            for c0, c1 in _spans(x.shape[0], chunk):
                local, inside = _local_targets(targets[c0:c1], vocab_start + r0, r1 - r0)
                z = _block_logits(x[c0:c1], w, b, scale, softcap)
                g = _block_grad(z, lse[c0:c1], local, inside, grad[c0:c1], scale, softcap).to(x.dtype)
                if grad_x is not None:
                    _add_product(grad_x[c0:c1], g, w)
                if slab_grad is not None:
                    _add_product(slab_grad, g.t(), x[c0:c1])
                if grad_b is not None:
                    grad_b[r0:r1] += g.sum(dim=0, dtype=wide)
            if slab_grad is not None and not in_place:
                grad_w[r0:r1] = slab_grad  # type: ignore[index]
        return (None if grad_x is None else grad_x.to(x.dtype), grad_w,
                None if grad_b is None else grad_b.to(bias.dtype), *([None] * 9))


def chunked_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None = None, *, chunk_tokens: int,
                               group: ProcessGroup | None = None, vocab_start: int = 0, valid: int | None = None,
                               scale: float = 1.0, softcap: float | None = None, ignore_index: int = -100,
                               slab_rows: int = SLAB_ROWS) -> torch.Tensor:
    """Per-token ``-log softmax(f(hidden @ weight^T + bias))[target]`` over the whole (possibly
    vocabulary-parallel) vocabulary, shaped like ``targets`` (fp32), 0 where a target is ``ignore_index``;
    ``hidden`` is (..., width) with ``targets``' leading shape."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    valid = weight.shape[0] if valid is None else valid
    flat = _ChunkedHeadCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                                          group, vocab_start, valid, chunk_tokens, slab_rows, float(scale),
                                          None if softcap is None else float(softcap), ignore_index)
    return flat.view(targets.shape)
