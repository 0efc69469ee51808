"""Losses of a Hugging Face model's (possibly vocabulary-parallel) logits: the next-token loss of a causal LM,
the per-token losses of an eval, the decoder-label loss of an encoder-decoder model. Each reads the vocabulary
slice of this rank from the model's output layer and reduces over the tensor group only when it is sharded."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup
from transformers import PreTrainedModel

from modeling.experts import SplitRouterLoss
from parallel.cross_entropy import causal_lm_loss, token_loss, vocab_parallel_cross_entropy
from parallel.layers import VocabParallelHead


def vocab_slice(head: nn.Module) -> tuple[int, int | None]:
    """(first vocabulary row, number of real rows) of this rank's logits; (0, None) when unsharded."""
    if isinstance(head, VocabParallelHead):
        return head.vocab_start, head.valid_rows
    return 0, None


def lm_loss(model: PreTrainedModel, logits: torch.Tensor, labels: torch.Tensor,
            tp_group: ProcessGroup | None) -> torch.Tensor:
    """Mean next-token loss from the model's (possibly vocabulary-sharded) logits."""
    start, valid = vocab_slice(model.get_output_embeddings())
    return causal_lm_loss(logits, labels, tp_group if valid is not None else None, start, valid)


def target_losses(head: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
                  tp_group: ProcessGroup | None) -> torch.Tensor:
    """Per-token NLL of ``targets`` under the logits (of output layer ``head``) at the same positions, 0 where a
    target is -100."""
    start, valid = vocab_slice(head)
    keep = targets != -100
    losses = vocab_parallel_cross_entropy(logits, targets.masked_fill(~keep, 0),
                                          tp_group if valid is not None else None, start, valid)
    return losses * keep


def context_lm_loss(head: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
                    tp_group: ProcessGroup | None, context: int) -> torch.Tensor:
    """This context rank's share of the mean next-token loss of whole sequences, times ``context``: its targets'
    summed loss over the whole sequences' target count (``parallel.context.local_tokens``; each sequence has one
    target fewer than tokens). The data-parallel gradient mean over data x context then gives the mean loss's
    gradient."""
    whole = targets.shape[0] * (targets.shape[1] * context - 1)
    return target_losses(head, logits, targets, tp_group).sum() * (context / whole)


def router_aux_loss(model: PreTrainedModel, output: Any, sequence_group: ProcessGroup | None = None
                    ) -> torch.Tensor | float:
    """The model's auxiliary load-balancing loss (``output_router_logits``) times its coefficient, as its forward
    adds it to the loss when given labels; 0 when the model computes none. Under sequence parallelism
    (``sequence_group``) its routers saw this rank's part of the sequence: the loss is taken over every part
    (``modeling.experts.SplitRouterLoss``)."""
    if getattr(output, "aux_loss", None) is None:
        return 0.0
    if sequence_group is None:
        return getattr(model, "router_aux_loss_coef", model.config.router_aux_loss_coef) * output.aux_loss
    split = SplitRouterLoss(model)
    totals = split.add(split.start(output.logits), output.router_logits)
    return split.loss(totals, output.logits.shape[0] * output.logits.shape[1], sequence_group)


def seq2seq_loss(model: PreTrainedModel, logits: torch.Tensor, labels: torch.Tensor,
                 tp_group: ProcessGroup | None) -> torch.Tensor:
    """Mean loss of the decoder's labels (no shift; -100 = padding) from (possibly sharded) logits."""
    start, valid = vocab_slice(model.get_output_embeddings())
    return token_loss(logits, labels, tp_group if valid is not None else None, start, valid)


def next_token_losses(model: PreTrainedModel, logits: torch.Tensor, input_ids: torch.Tensor,
                      tp_group: ProcessGroup | None) -> torch.Tensor:
    """Per-token NLL of ``input_ids[:, 1:]`` given the logits before them, shape (batch, seq - 1)."""
    head = model.get_output_embeddings()
    if isinstance(head, VocabParallelHead):
        return vocab_parallel_cross_entropy(logits[:, :-1], input_ids[:, 1:], tp_group, head.vocab_start,
                                            head.valid_rows)
    return vocab_parallel_cross_entropy(logits[:, :-1], input_ids[:, 1:])
