"""Config slice -> AdamW + warm-up/cosine schedule -> ``deepspeed.initialize(..., mpu=groups)``."""

from __future__ import annotations

import math
from typing import Any

import torch

from training.config import ConfigError, OptimConfig


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
    """Decay matrices only; biases, norms and other 1-D parameters are not decayed (GPT-2/Llama practice)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, total_steps: int):
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                                  eps=optim.eps)
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


def build(model: torch.nn.Module, optim: OptimConfig, total_steps: int, ds_config: dict[str, Any], groups):
    """Wrap ``model`` in a DeepSpeed engine whose ZeRO works over ``groups``' data-parallel group."""
    import deepspeed

    optimizer, scheduler = build_optimizer(model, optim, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=groups, dist_init_required=False)
    return engine
