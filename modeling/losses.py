"""Losses of a Hugging Face model's output layer: the per-token NLL of targets at the same positions, which every
training and evaluation loss is made of (causal LM, its context-parallel share, encoder-decoder labels, the
per-token sums of an eval, a pipeline's last stage).

``token_losses`` runs the model's forward with its output layer replaced by a stand-in that keeps the hidden
states, then calls the output layer itself (so that ZeRO-3 gathers its weight, tied or not, in its own call) with
a forward that computes the loss over chunks of ``parallel.loss_chunk_tokens`` tokens
(``parallel.chunked_cross_entropy``): the full (tokens x vocabulary) logits are never held. A model that changes
its logits after the layer (Gemma's soft-capping, Cohere's and Granite's scales, BART's ``final_logits_bias``)
has that change applied in the chunks; what the model's forward did to the stand-in's output is checked against
it once per output layer, and a model doing anything else gets the full logits (as with chunks of 0 tokens, and
for output layers other than ``nn.Linear`` and ``VocabParallelHead``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup
from transformers import PreTrainedModel

from modeling.experts import SplitRouterLoss
from parallel.chunked_cross_entropy import chunked_head_cross_entropy
from parallel.comm import copy_to_tensor_parallel_region, gather_from_sequence_parallel_region
from parallel.cross_entropy import vocab_parallel_cross_entropy
from parallel.layers import VocabParallelHead

IGNORE = -100
_CHECKED = "chunked_loss_check"  # on the output layer: "chunked" or "full", once its model's forward was checked


def vocab_slice(head: nn.Module) -> tuple[int, int | None]:
    """(first vocabulary row, number of real rows) of this rank's logits; (0, None) when unsharded."""
    if isinstance(head, VocabParallelHead):
        return head.vocab_start, head.valid_rows
    return 0, None


def _group(head: nn.Module) -> ProcessGroup | None:
    return head.group if isinstance(head, VocabParallelHead) else None


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Each position's target is the next label (as transformers shifts them); the last position has none."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)


def mean_loss(losses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean of per-token ``losses`` over the targets that count (not -100)."""
    return losses.sum() / (targets != IGNORE).sum().clamp(min=1)


def context_share(losses: torch.Tensor, targets: torch.Tensor, context: int) -> torch.Tensor:
    """This context rank's share of the mean next-token loss of whole sequences, times ``context``: its targets'
    summed loss over the whole sequences' target count (``parallel.context.local_tokens``; each sequence has one
    target fewer than tokens). The data-parallel gradient mean over data x context then gives the mean loss's
    gradient."""
    whole = targets.shape[0] * (targets.shape[1] * context - 1)
    return losses.sum() * (context / whole)


def logit_losses(head: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of ``targets`` under full (possibly vocabulary-sharded) ``logits`` of output layer ``head``,
    0 where a target is -100."""
    start, valid = vocab_slice(head)
    keep = targets != IGNORE
    return vocab_parallel_cross_entropy(logits, targets.masked_fill(~keep, 0), _group(head), start, valid) * keep


def lm_loss(model: PreTrainedModel, logits: torch.Tensor, labels: torch.Tensor,
            tp_group: ProcessGroup | None = None) -> torch.Tensor:
    """Mean next-token loss from full logits (the output layer's group is used: ``tp_group`` is only named)."""
    targets = next_token_targets(labels)
    return mean_loss(logit_losses(model.get_output_embeddings(), logits, targets), targets)


def seq2seq_loss(model: PreTrainedModel, logits: torch.Tensor, labels: torch.Tensor,
                 tp_group: ProcessGroup | None = None) -> torch.Tensor:
    """Mean loss of the decoder's labels (no shift; -100 = padding) from full logits."""
    return mean_loss(logit_losses(model.get_output_embeddings(), logits, labels), labels)


def context_lm_loss(head: nn.Module, logits: torch.Tensor, targets: torch.Tensor, tp_group: ProcessGroup | None,
                    context: int) -> torch.Tensor:
    """``context_share`` from full logits."""
    return context_share(logit_losses(head, logits, targets), targets, context)


def router_aux_loss(model: PreTrainedModel, output: Any, tokens: int,
                    sequence_group: ProcessGroup | None = None) -> torch.Tensor | float:
    """The model's auxiliary load-balancing loss (``output_router_logits``) times its coefficient, as its forward
    adds it to the loss when given labels; 0 when the model computes none. ``tokens``: the micro-batch's tokens.
    Under sequence parallelism (``sequence_group``) its routers saw this rank's part of the sequence: the loss is
    taken over every part (``modeling.experts.SplitRouterLoss``)."""
    if getattr(output, "aux_loss", None) is None:
        return 0.0
    if sequence_group is None:
        return getattr(model, "router_aux_loss_coef", model.config.router_aux_loss_coef) * output.aux_loss
    split = SplitRouterLoss(model)
    totals = split.add(split.start(output.aux_loss), output.router_logits)
    return split.loss(totals, tokens, sequence_group)


# --- the chunked path ------------------------------------------------------------------------------
def logit_transform(model: Any) -> tuple[float, float | None]:
    """(scale, soft cap) of what the model's forward does to the output layer's logits: ``softcap *
    tanh(scale * z / softcap)`` (Gemma 2/3/3n/4 and PaliGemma's ``final_logit_softcapping``, RecurrentGemma's
    ``logits_soft_cap``), ``z * scale`` (Cohere's ``logit_scale``, 1 / Granite's ``logits_scaling``)."""
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    scale, softcap = 1.0, None
    for config in configs:
        softcap = getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_soft_cap", None) \
            or softcap
        if getattr(config, "logits_scaling", None):
            scale = 1.0 / config.logits_scaling
    if isinstance(getattr(model, "logit_scale", None), (int, float)):
        scale = float(model.logit_scale)
    return scale, softcap


class _Stand(nn.Module):
    """The output layer's stand-in during the model's forward: keeps the hidden states and returns values the
    forward's own logit changes can be read from, of the hidden states' shape: +-2^k for k = -4 .. 10 (exact in
    every float dtype; small ones show what is added, large ones a soft cap)."""

    def __init__(self, checked: bool):
        super().__init__()
        self.checked = checked
        self.hidden: torch.Tensor | None = None
        self.probe: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        index = torch.arange(hidden.shape[-1], device=hidden.device)
        values = (torch.exp2(index % 15 - 4.0) * (1 - 2 * (index // 15 % 2))).to(hidden.dtype)
        probe = values.expand(hidden.shape) if self.checked else values.expand(hidden.shape).clone()
        self.probe = probe
        return probe


def _parent(model: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    name = next(name for name, sub in model.named_modules() if sub is module)
    parent, _, attribute = name.rpartition(".")
    return model.get_submodule(parent), attribute


@contextmanager
def _standing_in(model: nn.Module, head: nn.Module, stand: _Stand) -> Iterator[torch.Tensor | None]:
    """Within: ``stand`` replaces ``head`` in ``model``, and a ``final_logits_bias`` buffer (BART, Marian) adds 0
    to what the stand-in gives; yields that bias (this rank's slice)."""
    parent, attribute = _parent(model, head)
    bias = getattr(model, "final_logits_bias", None)
    setattr(parent, attribute, stand)
    if bias is not None:
        model.final_logits_bias = bias.new_zeros(1, 1)
    try:
        yield None if bias is None else bias.reshape(-1)
    finally:
        setattr(parent, attribute, head)
        if bias is not None:
            model.final_logits_bias = bias


def _agrees(stand: _Stand, logits: Any, scale: float, softcap: float | None) -> bool:
    """Whether the forward did to the stand-in's values what ``logit_transform`` says, and nothing else (within
    16 roundings of the forward's dtype: it computes the change in that dtype, we in fp64)."""
    probe = stand.probe
    if not isinstance(logits, torch.Tensor) or probe is None or logits.shape != probe.shape:
        return False
    expected = probe.double() * scale
    if softcap is not None:
        expected = softcap * torch.tanh(expected / softcap)
    return torch.allclose(logits.double(), expected, rtol=16 * torch.finfo(probe.dtype).eps, atol=0.0)


def _logits_of(output: Any) -> Any:
    return output if isinstance(output, torch.Tensor) else output.logits


def _chunked_head_forward(head: Any, targets: torch.Tensor, chunk_tokens: int, scale: float,
                          softcap: float | None, extra_bias: torch.Tensor | None) -> Callable[[torch.Tensor], Any]:
    """The output layer's forward for one call: per-token losses of ``targets`` instead of logits."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        start, valid = vocab_slice(head)
        group, entry = _group(head), getattr(head, "entry", None)
        if entry is not None and entry.group is not None:  # the region's entry, without the overlap of dW
            hidden = (gather_from_sequence_parallel_region(hidden, group) if entry.sequence_parallel
                      else copy_to_tensor_parallel_region(hidden, group))
        bias = head.bias
        if extra_bias is not None:
            bias = extra_bias if bias is None else bias + extra_bias
        return chunked_head_cross_entropy(hidden, head.weight, targets, bias, chunk_tokens=chunk_tokens,
                                          group=group, vocab_start=start, valid=valid, scale=scale, softcap=softcap)

    return forward


def _call_head(head: nn.Module, forward: Callable[[torch.Tensor], Any], hidden: torch.Tensor) -> Any:
    """``head(hidden)`` with ``forward`` as its forward for this call: its hooks (ZeRO-3's gather) run."""
    own = head.__dict__.get("forward")  # a zero-bubble schedule's deferring forward, kept
    head.forward = forward  # type: ignore[method-assign]
    try:
        return head(hidden)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own  # type: ignore[method-assign]


def token_losses(model: Any, forward: Callable[[], Any], targets: torch.Tensor,
                 chunk_tokens: int) -> tuple[torch.Tensor, Any]:
    """Run ``forward()`` (the forward of ``model``, or of a module running it, e.g. its DeepSpeed engine); return
    (the per-token NLL of ``targets`` under the output layer at the same positions, 0 where a target is -100;
    what ``forward()`` returned). ``chunk_tokens`` > 0: the output layer runs in chunks of that many tokens,
    and the returned output's logits are not the model's (only their leading shape is)."""
    head = model.get_output_embeddings()
    chunkable = type(head) is nn.Linear or isinstance(head, VocabParallelHead)
    if chunk_tokens <= 0 or not chunkable or getattr(head, _CHECKED, None) == "full":
        output = forward()
        return logit_losses(head, _logits_of(output), targets), output
    stand = _Stand(checked=getattr(head, _CHECKED, None) == "chunked")
    with _standing_in(model, head, stand) as extra_bias:
        output = forward()
    scale, softcap = logit_transform(model)
    if not stand.checked and not (stand.hidden is not None and stand.hidden.is_meta):  # meta: no values to check
        agrees = stand.hidden is not None and _agrees(stand, _logits_of(output), scale, softcap)
        setattr(head, _CHECKED, "chunked" if agrees else "full")
        if not agrees:  # once per output layer: the model's own logits
            output = forward()
            return logit_losses(head, _logits_of(output), targets), output
    assert stand.hidden is not None  # checked: the forward calls its output layer
    head_forward = _chunked_head_forward(head, targets, chunk_tokens, scale, softcap, extra_bias)
    return _call_head(head, head_forward, stand.hidden), output
