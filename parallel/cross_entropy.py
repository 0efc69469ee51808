"""Cross entropy over vocabulary-parallel logits, without gathering the full vocabulary
(after Megatron-LM ``tensor_parallel/cross_entropy.py``).

Each rank holds logits for vocabulary rows ``[vocab_start, vocab_start + local)``, of which the first
``valid`` are real (the rest pad a vocabulary that does not divide the group and are masked to -inf).
Three all-reduces of (tokens,)-sized tensors: the max, the target logit, the sum of exponentials.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from parallel.comm import all_reduce


# --- numerics (no communication) -------------------------------------------------------------------
def _shifted_logits(logits: torch.Tensor, valid: int) -> torch.Tensor:
    logits = logits.float()
    if valid < logits.shape[-1]:
        pad = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        pad[valid:] = True
        logits = logits.masked_fill(pad, float("-inf"))
    return logits


def _target_positions(target: torch.Tensor, vocab_start: int, local: int) -> tuple[torch.Tensor, torch.Tensor]:
    outside = (target < vocab_start) | (target >= vocab_start + local)
    return (target - vocab_start).masked_fill(outside, 0), outside


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, valid):
        logits = _shifted_logits(logits, valid)
        local_max = logits.max(dim=-1).values
        logits = logits - all_reduce(local_max, group, dist.ReduceOp.MAX).unsqueeze(-1)
        local_target, outside = _target_positions(target, vocab_start, logits.shape[-1])
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        target_logit = all_reduce(target_logit, group)
        exp = logits.exp()
        sum_exp = all_reduce(exp.sum(dim=-1), group)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
        return grad * grad_loss.unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None = None,
                                 vocab_start: int = 0, valid: int | None = None) -> torch.Tensor:
    """Per-token loss ``-log softmax(full logits)[target]`` from this rank's vocabulary slice."""
    valid = logits.shape[-1] if valid is None else valid
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_start, valid)


def token_loss(logits: torch.Tensor, labels: torch.Tensor, group: ProcessGroup | None = None, vocab_start: int = 0,
               valid: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Mean loss of ``labels`` under the logits at the same positions (sequence-to-sequence decoders);
    labels equal to ``ignore_index`` (padding) do not count."""
    keep = labels != ignore_index
    losses = vocab_parallel_cross_entropy(logits, labels.masked_fill(~keep, 0), group, vocab_start, valid)
    return (losses * keep).sum() / keep.sum().clamp(min=1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, group: ProcessGroup | None = None, vocab_start: int = 0,
                   valid: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token loss: logits at position t predict labels at t + 1 (as transformers computes it);
    labels equal to ``ignore_index`` do not count."""
    return token_loss(logits[:, :-1], labels[:, 1:], group, vocab_start, valid, ignore_index)
