"""Config slice -> AdamW + warm-up/cosine schedule -> ``deepspeed.initialize(..., mpu=groups)``."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, cast

import torch

from modeling.build import hidden_size
from parallel.comm import comm_device
from training.config import ConfigError
from training.config_schema import OptimConfig
from training.deepspeed_config import model_sized_buckets

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from parallel.groups import ProcessGroups


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Multiplier of ``optim.lr`` at a step: linear warm-up to 1, then cosine to ``min_lr_ratio``."""
    warmup, floor = optim.warmup_steps, optim.min_lr_ratio

    def multiplier(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases, norms and other 1-D parameters are not decayed (GPT-2/Llama practice). An
    empty group is left out (OLMo's norms have no parameters): DeepSpeed drops it, and the schedule must not
    count it. Expert-parallel parameters (``modeling.experts``) get groups of their own, marked as DeepSpeed's
    MoE groups, so that ZeRO reduces and partitions them over their expert-data-parallel group."""
    groups: dict[tuple[bool, str | None], list[torch.nn.Parameter]] = {}
    for _, param in model.named_parameters():
        if param.requires_grad:
            expert_group = getattr(param, "group_name", None) if getattr(param, "allreduce", True) is False else None
            groups.setdefault((param.dim() >= 2, expert_group), []).append(param)
    order = sorted(groups, key=lambda key: (key[1] is not None, key[1] or "", not key[0]))
    return [{"params": groups[key], "weight_decay": weight_decay if key[0] else 0.0,
             **({"moe": True, "name": key[1]} if key[1] else {})} for key in order]


def register_expert_layers(model: torch.nn.Module, groups: ProcessGroups) -> None:
    """Make DeepSpeed treat ``model``'s expert-parallel modules (``modeling.experts``) as its MoE layers, before
    its engine is built: the engine decides that a model has expert layers, and its ZeRO optimizer gives their
    parameter groups the expert-data-parallel group, by the class of the modules, and it looks the groups up by
    name (``ep_size_N``) in module-level registries its own MoE layers fill with groups of DeepSpeed's rank
    layout. Each expert-parallel module's class also derives from DeepSpeed's ``MoE`` (no group creation of
    its own), and colonnade's groups are registered first under that name."""
    if groups.expert == 1:
        return
    from deepspeed.utils import groups as deepspeed_groups

    from modeling.experts import expert_group_name

    for module in model.modules():
        if hasattr(module, "expert_group"):
            module.__class__ = _as_deepspeed_moe(cast(Any, module).__class__)
    name = expert_group_name(groups.expert)
    deepspeed_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep_group
    deepspeed_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(groups.ep_ranks)
    deepspeed_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp_group
    deepspeed_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(groups.edp_ranks)


class AdamW(torch.optim.AdamW):
    """torch AdamW that skips its whole update when any rank of ``nonfinite_group`` has a non-finite
    gradient, all ranks together. DeepSpeed guards only its ZeRO and mixed-precision optimizers; with ZeRO-0
    in fp32 it calls this one directly and reads ``overflow`` after ``step()`` to leave the LR schedule
    where it was and count the step in ``engine.skipped_steps``."""

    nonfinite_group = None  # set for ZeRO-0, where DeepSpeed steps this optimizer itself
    overflow = False

    def step(self, closure: Any = None) -> Any:  # torch's signature: overloads on closure
        if self.nonfinite_group is not None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            flag = torch.zeros(1, device=comm_device(self.nonfinite_group))
            if grads:  # one device-side reduction, not a host read per gradient
                flag += torch.stack([torch.isfinite(g).all().logical_not() for g in grads]).any().to(flag.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.nonfinite_group)
            self.overflow = bool(flag.item())
            if self.overflow:
                return None
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, total_steps: int, cls=AdamW):
    """AdamW over ``param_groups`` and the warm-up/cosine ``LambdaLR``; ``cls=torch.optim.AdamW`` for
    baselines that measure torch / DeepSpeed without colonnade."""
    optimizer = cls(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                    fused=optim.fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, total_steps))
    return optimizer, scheduler


def check_precision(precision: str) -> None:
    """Fail before training when the accelerator cannot run the requested precision."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    supported = {"fp32": True, "bf16": accel.is_bf16_supported(), "fp16": accel.is_fp16_supported()}
    if not supported[precision]:
        usable = [p for p, ok in supported.items() if ok]
        raise ConfigError(f"precision={precision} is not supported on this {accel.device_name()} "
                          f"accelerator; use one of {usable} (CPU runs use fp32)")


def _not_untested_optimizer(record) -> bool:
    """DeepSpeed warns that ZeRO runs "an untested optimizer": ours, torch's AdamW with a non-finite guard."""
    return "untested optimizer" not in record.getMessage()


@functools.cache
def _as_deepspeed_moe(experts_class: Any) -> type:
    from deepspeed.moe.layer import MoE

    def set_deepspeed_parallelism(self: Any, *args: Any, **kwargs: Any) -> None:
        """DeepSpeed's engine asks its MoE layers to create their groups: colonnade's are registered."""

    return type(experts_class.__name__, (experts_class, MoE), {"set_deepspeed_parallelism": set_deepspeed_parallelism})


def hidden_size_of(model: torch.nn.Module) -> int | None:
    """``modeling.build.hidden_size`` of the first module with an HF config (a pipeline chunk's layers carry the
    model's)."""
    config = next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")), None)
    return hidden_size(config)


def fill_model_sized_buckets(ds_config: dict[str, Any], model: torch.nn.Module) -> None:
    """The ZeRO bucket sizes ``ds_config`` leaves out, sized by ``model``'s hidden size (``model_sized_buckets``),
    written into ``ds_config`` (the run records it in deepspeed.json); a model without one keeps DeepSpeed's."""
    zero = ds_config.get("zero_optimization", {})
    hidden = hidden_size_of(model) if zero.get("stage", 0) else None
    for key, value in (model_sized_buckets(hidden, zero["stage"]) if hidden else {}).items():
        zero.setdefault(key, value)


def build(model: torch.nn.Module, optim: OptimConfig, total_steps: int, ds_config: dict[str, Any],
          groups: ProcessGroups) -> DeepSpeedEngine:
    """Wrap ``model`` in a DeepSpeed engine whose ZeRO works over ``groups``' data-parallel group; bucket sizes
    ``ds_config`` leaves out are filled in it from the model's hidden size."""
    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    if _not_untested_optimizer not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_not_untested_optimizer)

    fill_model_sized_buckets(ds_config, model)
    register_expert_layers(model, groups)
    optimizer, scheduler = build_optimizer(model, optim, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=groups, dist_init_required=False)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if engine.zero_optimization_stage() != stage:  # the run reads its stage from the config only
        raise RuntimeError(f"DeepSpeed built a ZeRO-{engine.zero_optimization_stage()} engine from a JSON whose "
                           f"zero_optimization.stage is {stage} (parallel.zero_stage)")
    if engine.optimizer is optimizer:  # ZeRO-0 in fp32: no DeepSpeed wrapper checks the gradients
        optimizer.nonfinite_group = torch.distributed.group.WORLD
    elif hasattr(engine.optimizer, "check_grad_overflow"):  # ZeRO 1/2 skip non-finite steps in fp32 too
        engine.optimizer.check_grad_overflow = True
    return engine
