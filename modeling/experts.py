"""Expert parallelism on transformers' own experts modules.

Every mixture-of-experts layer in transformers keeps its experts in one module decorated by
``use_experts_implementation`` (3-D ``gate_up_proj`` / ``down_proj``, optional biases), called as
``experts(hidden_states, top_k_index, top_k_weights)`` after the model's own router. ``expert_parallelize``
keeps, on each rank of the expert-parallel group, its block of experts (the leading dimension of every expert
tensor) and gives the module a forward that sends each token-expert pair to the rank holding the expert
(``parallel.experts.expert_parallel``) and computes the local experts there with the module's own
implementation (eager, grouped_mm, ...). Routers, shared experts, dense layers and the losses stay the model's.

DeepSpeed reduces and partitions expert parameters over the expert-data-parallel group when they carry its marks
(``allreduce=False``, ``group_name``), they sit in optimizer groups marked ``moe``, and the model holds a module
of its MoE class (how its engine decides the model has expert layers): the modules here derive from it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from parallel.experts import expert_parallel
from parallel.groups import ProcessGroups


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The experts modules of ``model`` by name (transformers marks them ``_is_expert_parallel``)."""
    return {name: module for name, module in model.named_modules() if hasattr(module, "_is_expert_parallel")}


def expert_group_name(expert: int) -> str:
    """DeepSpeed's name of the expert-parallel group of size ``expert`` (its ``ep_size_N``)."""
    return f"ep_size_{expert}"


def check_expert_parallel_fits(model: nn.Module, expert: int) -> None:
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


def check_router_loss_fits(hf_config: Any, pipeline: int, sequence_parallel: bool) -> None:
    """ValueError when the model's own load-balancing loss (``output_router_logits``) cannot be computed as it
    computes it: over every layer's router logits of a micro-batch at once."""
    if not getattr(hf_config, "output_router_logits", False):
        return
    if pipeline > 1:
        raise ValueError(f"model.config.output_router_logits=true with parallel.pipeline={pipeline}: the model's "
                         f"load-balancing loss is one function of every layer's router logits, which the stages "
                         f"hold apart; set model.config.output_router_logits=false or parallel.pipeline=1")
    if sequence_parallel:
        raise ValueError("model.config.output_router_logits=true with parallel.sequence_parallel=true: each tensor "
                         "rank's routers see only its part of the sequence, the loss needs all of it; set "
                         "model.config.output_router_logits=false or parallel.sequence_parallel=false")


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
        module.__class__ = _expert_parallel_class(type(module))


@functools.cache
def _expert_parallel_class(experts_class: type) -> type:
    from deepspeed.moe.layer import MoE

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

    def set_deepspeed_parallelism(self: Any, *args: Any, **kwargs: Any) -> None:
        """DeepSpeed's engine asks its MoE layers to create their groups: colonnade's are registered already
        (``training.engine.register_expert_groups``)."""

    return type(f"ExpertParallel{experts_class.__name__}", (experts_class, MoE),
                {"forward": forward, "set_deepspeed_parallelism": set_deepspeed_parallelism})
