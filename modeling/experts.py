"""Expert parallelism on transformers' own experts modules.

Every mixture-of-experts layer in transformers keeps its experts in one module decorated by
``use_experts_implementation`` (3-D ``gate_up_proj`` / ``down_proj``, optional biases), called as
``experts(hidden_states, top_k_index, top_k_weights)`` after the model's own router. ``expert_parallelize``
keeps, on each rank of the expert-parallel group, its block of experts (the leading dimension of every expert
tensor) and gives the module a forward that sends each token-expert pair to the rank holding the expert
(``parallel.experts.expert_parallel``) and computes the local experts there with the module's own
implementation (eager, grouped_mm, ...). Routers, shared experts, dense layers and the losses stay the model's.

DeepSpeed reduces and partitions expert parameters over the expert-data-parallel group when they carry its marks
(``allreduce=False``, ``group_name``, set here), they sit in optimizer groups marked ``moe`` and the model holds a
module of its MoE class (``training.engine`` sees to the last two).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from parallel.comm import reduce_from_tensor_parallel_region
from parallel.experts import expert_parallel
from parallel.groups import ProcessGroups


def experts_modules(model: nn.Module) -> dict[str, Any]:
    """The experts modules of ``model`` by name (transformers marks them ``_is_expert_parallel``)."""
    return {name: module for name, module in model.named_modules() if hasattr(module, "_is_expert_parallel")}


def active_parameters(model: nn.Module) -> int:
    """Parameters one token's forward multiplies with: every one outside the routed experts, and of each layer's
    experts the ``num_experts_per_tok`` it is routed to (the model's total for a dense model)."""
    total = sum(p.numel() for p in model.parameters())
    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", 1) or 1
    for module in experts_modules(model).values():
        routed = sum(p.numel() for p in module.parameters())
        total += routed * top_k // getattr(module, "total_experts", module.num_experts) - routed
    return total


def expert_group_name(expert: int) -> str:
    """DeepSpeed's name of the expert-parallel group of size ``expert`` (its ``ep_size_N``)."""
    return f"ep_size_{expert}"


def check_expert_parallel_fits(model: Any, expert: int) -> None:
    """ValueError naming the model or the layer when ``model``'s experts cannot be split ``expert`` ways."""
    if expert == 1:
        return
    modules = experts_modules(model)
    if not modules:
        raise ValueError(f"parallel.expert={expert}: model_type {model.config.model_type!r} has no "
                         f"mixture-of-experts layers; set parallel.expert=1")
    for name, module in modules.items():
        if module.num_experts % expert:
            raise ValueError(f"parallel.expert={expert} does not divide the {module.num_experts} experts of {name}")
        shared = [p for p, t in module.named_parameters(recurse=False) if t.shape[0] != module.num_experts]
        if shared:
            raise ValueError(f"parallel.expert={expert}: {name} has parameters shared by its experts ({shared}), "
                             f"which expert parallelism does not split; set parallel.expert=1")


def check_router_loss_fits(model: Any, pipeline: int, sequence_parallel: bool, precision: str) -> None:
    """ValueError when the model's own load-balancing loss (``output_router_logits``) cannot be taken over a
    forward split across stages or sequence shards (``SplitRouterLoss``)."""
    split = [f"parallel.pipeline={pipeline}"] * (pipeline > 1) + ["parallel.sequence_parallel=true"] * sequence_parallel
    if not getattr(model.config, "output_router_logits", False) or not split:
        return
    if not SplitRouterLoss.applies(model):
        raise ValueError(f"model.config.output_router_logits=true with {' and '.join(split)}: model_type "
                         f"{model.config.model_type!r}'s load-balancing loss is not transformers' standard one, "
                         f"which colonnade splits; set model.config.output_router_logits=false or undo the split")
    if pipeline > 1 and precision != "fp32":
        raise ValueError(f"model.config.output_router_logits=true with parallel.pipeline={pipeline} and "
                         f"precision={precision}: the load-balancing totals (tokens per expert) travel between "
                         f"stages in the activations' dtype, exact only in fp32; use precision=fp32 or set "
                         f"model.config.output_router_logits=false")


def expert_parallelize(model: nn.Module, groups: ProcessGroups) -> None:
    """Keep this rank's block of each experts module's experts and dispatch tokens to the others' (in place; the
    model may be on the meta device). Each kept tensor records its range of the full tensor's experts and their
    number (``expert_range``, ``expert_total``: read by ``modeling.shards``)."""
    if groups.expert == 1:
        return
    check_expert_parallel_fits(model, groups.expert)
    for module in experts_modules(model).values():
        total = module.num_experts
        local = total // groups.expert
        start = groups.ep_rank * local
        for name, param in list(module.named_parameters(recurse=False)):
            kept = nn.Parameter(param.data.narrow(0, start, local).clone(), requires_grad=param.requires_grad)
            kept.expert_range = (start, start + local)  # type: ignore[attr-defined]
            kept.expert_total = total  # type: ignore[attr-defined]
            kept.allreduce = False  # type: ignore[attr-defined]  # DeepSpeed's mark of an expert parameter
            kept.group_name = expert_group_name(groups.expert)  # type: ignore[attr-defined]
            setattr(module, name, kept)
        module.num_experts = local
        module.total_experts = total
        module.expert_group = groups.ep_group
        module.__class__ = _expert_parallel_class(module.__class__)


@functools.cache
def _expert_parallel_class(experts_class: Any) -> type:
    own_forward = experts_class.forward

    def forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        def compute(tokens: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
            if tokens.shape[0] == 0:  # no token for these experts: zero gradients, not none, for ZeRO's buckets
                return tokens + sum(p.sum() for p in self.parameters(recurse=False)) * 0
            weight = torch.ones(tokens.shape[0], 1, dtype=top_k_weights.dtype, device=tokens.device)
            return own_forward(self, tokens, local_expert.unsqueeze(1), weight)

        return expert_parallel(hidden_states, top_k_index, top_k_weights, self.total_experts, self.expert_group,
                               compute)

    return type(f"ExpertParallel{experts_class.__name__}", (experts_class,), {"forward": forward})


class SplitRouterLoss:
    """transformers' load-balancing loss (``load_balancing_loss_func``: E x sum over experts of the fraction of
    routed rows and the mean router probability, both over every MoE layer's rows) of a forward split over
    pipeline stages or sequence shards. Each stage adds its layers' tokens per expert and router-probability
    sums, in layer order as the function does, to running totals that travel with the hidden states
    (differentiably: every stage's routers get the whole loss's gradient); under sequence parallelism the last
    stage sums the totals over the tensor group (all-reduce forward, identity backward: each rank's routers get
    the gradient of its own tokens, which sequence parallelism sums over the group like every replicated
    parameter's) and takes the loss of them. ``size``: the totals' length (counts, then probability sums)."""

    def __init__(self, model: Any):
        self.experts: int = model.num_experts
        self.top_k: int = model.num_experts_per_tok
        self.coefficient: float = model.router_aux_loss_coef
        self.layers = len(experts_modules(model))
        self.size = 2 * self.experts

    @staticmethod
    def applies(model: Any) -> bool:
        """Whether ``model`` adds transformers' standard load-balancing loss (Mixtral's function, which 31 of the
        34 MoE models defining one share) to its loss."""
        import sys

        from transformers.models.mixtral import modeling_mixtral

        own = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
        standard = modeling_mixtral.load_balancing_loss_func.__code__
        return (getattr(model.config, "output_router_logits", False) and own is not None
                and (own.__code__.co_code, own.__code__.co_consts) == (standard.co_code, standard.co_consts))

    def add(self, totals: torch.Tensor, router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
        counts, probabilities = totals[:self.experts], totals[self.experts:]
        for logits in router_logits:
            weights = torch.softmax(logits.float(), dim=-1)
            chosen = torch.topk(weights, self.top_k, dim=-1)[1]
            counts = counts + torch.bincount(chosen.reshape(-1), minlength=self.experts).to(counts)
            probabilities = probabilities + weights.sum(dim=0)
        return torch.cat([counts.detach(), probabilities])

    def start(self, like: torch.Tensor) -> torch.Tensor:
        """Totals before the first layer, on ``like``'s device."""
        return torch.zeros(self.size, dtype=torch.float32, device=like.device)

    def loss(self, totals: torch.Tensor, tokens: int, sequence_group: ProcessGroup | None = None) -> torch.Tensor:
        """``router_aux_loss_coef`` x the load-balancing loss of a micro-batch of ``tokens`` tokens (all of its
        sequence), from this rank's totals (``sequence_group``: summed over it first)."""
        if sequence_group is not None:
            totals = reduce_from_tensor_parallel_region(totals, sequence_group)
        rows = tokens * self.layers
        fraction, probability = totals[:self.experts] / rows, totals[self.experts:] / rows
        return self.coefficient * torch.sum(fraction * probability.unsqueeze(0)) * self.experts
