"""``parallel.sync_every: H``: infrequent synchronisation of data-parallel replicas (DiLoCo, Douillard et al. 2023).

Each data-parallel rank is a replica (tensor parallelism inside it): it takes ``H`` inner AdamW steps on its own
data with no gradient reduction (DeepSpeed's backward all-reduce is switched off, as for ZeRO-0 gradient
compression), then the replicas average their parameter deltas from the last synchronised point (the anchor)
over the data-parallel group, through ``parallel.grad_compression``'s codec when one is set, and an outer
Nesterov SGD step moves the anchor:

    delta = mean over replicas (anchor - theta);  m = mu * m + delta;  anchor -= lr_outer * (delta + mu * m)

and every replica continues from the new anchor (``outer_lr`` 1 and ``momentum`` 0, the defaults: the mean).
The outer state (anchor, momentum, the codec's residuals) is fp32, two to three copies of the rank's parameters;
it goes into the rank's checkpoint file with the replica's own inner AdamW moments (which differ between
replicas), read back at the same layout. Evals, checkpoints and the export see the synchronised model
(``before_save`` synchronises first where a run is not at such a point).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from parallel.compression import Codec, compressed_mean_

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from parallel.groups import ProcessGroups
    from training.config_schema import ParallelConfig


INNER_MOMENTS = ("exp_avg", "exp_avg_sq")


class OuterSync:
    """The outer loop of one engine's replicas over ``group`` (the data-parallel group)."""

    def __init__(self, engine: DeepSpeedEngine, group: dist.ProcessGroup | None, every: int, lr: float, momentum: float,
                 codec: str, error_feedback: bool):
        self.engine, self.group, self.every, self.lr, self.momentum = engine, group, every, lr, momentum
        self.codec = Codec(codec) if codec != "none" else None
        self.error_feedback = error_feedback and self.codec is not None
        self.params = dict(engine.module.named_parameters())
        self.state: dict[str, dict[str, torch.Tensor]] = {
            name: {"anchor": p.detach().float().clone(), "momentum": torch.zeros_like(p, dtype=torch.float32)}
            for name, p in self.params.items() if p.requires_grad}
        self.synced_at = 0
        engine.enable_backward_allreduce = False

    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (from 1): synchronise every ``every`` steps."""
        if step % self.every == 0:
            self.synchronise(step)

    def before_save(self, step: int) -> None:
        if self.synced_at != step:
            self.synchronise(step)

    @torch.no_grad()
    def synchronise(self, step: int) -> None:
        for name, state in self.state.items():
            param = self.params[name]
            delta = state["anchor"] - param.detach().float()
            self._mean_(delta, state)
            state["momentum"].mul_(self.momentum).add_(delta)
            state["anchor"].sub_(self.lr * (delta + self.momentum * state["momentum"]))
            param.copy_(state["anchor"])
        self.synced_at = step

    def _mean_(self, delta: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        flat = delta.view(-1)
        if self.codec is None:
            dist.all_reduce(flat, group=self.group)
            flat.div_(dist.get_world_size(self.group))
            return
        residual = None
        if self.error_feedback:
            residual = state.setdefault("residual", torch.zeros_like(flat))
        compressed_mean_(flat, self.group, self.codec, residual)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This replica's state by ``outer/<kind>/<parameter name>``, for the rank's checkpoint file: the outer
        loop's, and its inner AdamW moments (the checkpoint's shared moments are an even share of each replica's)."""
        inner = self.engine.optimizer.state
        values = {f"outer/{kind}/{name}": value for name, state in self.state.items() for kind, value in state.items()}
        for name in self.state:
            for kind in INNER_MOMENTS:
                if kind in inner.get(self.params[name], {}):
                    values[f"outer/inner_{kind}/{name}"] = inner[self.params[name]][kind]
        return values

    def load_state_dict(self, saved: dict[str, torch.Tensor], step: int) -> None:
        """What ``state_dict`` saved, after the checkpoint's shared state was restored."""
        inner = self.engine.optimizer.state
        for key, value in saved.items():
            _, kind, name = key.split("/", 2)
            param = self.params[name]
            if kind.startswith("inner_"):
                inner[param][kind.removeprefix("inner_")].copy_(value.view_as(param))
                continue
            self.state[name][kind] = value.to(param.device, torch.float32).reshape(
                param.shape if kind != "residual" else (-1,)).clone()
        self.synced_at = step


def attach(par: ParallelConfig, engine: DeepSpeedEngine, groups: ProcessGroups) -> OuterSync | None:
    """``par.sync_every > 1``: the outer loop over ``engine``'s replicas (also as ``engine.outer_sync``)."""
    engine.outer_sync = None
    if par.sync_every == 1:
        return None
    outer = OuterSync(engine, groups.dp_group, par.sync_every, par.outer_lr, par.outer_momentum,
                      par.grad_compression, par.error_feedback)
    engine.outer_sync = outer
    return outer


def replica_values(engine: Any) -> dict[str, torch.Tensor]:
    """What a rank saves of its outer loop (empty without one)."""
    outer = getattr(engine, "outer_sync", None)
    return outer.state_dict() if outer is not None else {}
