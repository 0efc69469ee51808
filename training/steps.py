"""The step seam: one optimizer step, and the forward-only sums evaluation needs, as the run's layout does
them. The implementation is chosen once when the run is assembled, as Megatron chooses its forward-backward
function: ``DataParallelStep`` here (any tensor-parallel degree, ZeRO 0-3) or ``PipelineRunner``
(training/pipeline.py) when ``parallel.pipeline > 1``. A new step path (expert or context parallel) is a new
``Step``, not a branch in the loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from modeling.losses import next_token_targets, token_losses
from parallel.context import local_tokens
from parallel.grad_norm import global_grad_norm
from parallel.groups import ProcessGroups
from training.events import Observers
from training.metrics import sum_over

if TYPE_CHECKING:
    from training.config import RunConfig
    from training.tasks import Task


class Step(ABC):
    @abstractmethod
    def train(self, batches: Any, step: int) -> tuple[float, float]:
        """Optimizer step ``step + 1`` over ``train.grad_accum`` micro-batches of ``batches``
        (``batch(step, micro)``): (the mean loss over the global batch, the global gradient norm), on every rank."""

    @abstractmethod
    def eval_sums(self, eval_batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]
                  ) -> tuple[torch.Tensor | float, float]:
        """Forward only over [(batch, weight)]: this data-parallel rank's weighted sum of next-token NLLs and
        its token count."""


def grad_norm(engine: Any, groups: ProcessGroups) -> float:
    """The global gradient norm of the step just taken, as DeepSpeed computed it for clipping."""
    norm = engine.get_global_grad_norm()
    if norm is None:  # ZeRO-0 in fp32 clips inside DeepSpeed without keeping the norm
        norm = global_grad_norm(engine.module.parameters(), groups.mp_group, groups.tp_rank)
    return float(norm)


class DataParallelStep(Step):
    """No pipeline: ``grad_accum`` forward/backward passes of the task's loss; DeepSpeed reduces and steps at the
    accumulation boundary."""

    def __init__(self, cfg: RunConfig, engine: Any, groups: ProcessGroups, task: Task, events: Observers):
        self.cfg, self.engine, self.groups, self.task, self.events = cfg, engine, groups, task, events

    def train(self, batches: Any, step: int) -> tuple[float, float]:
        engine, groups, last = self.engine, self.groups, self.cfg.train.grad_accum - 1
        micro_losses, norm = [], None
        for micro_index in range(last + 1):
            batch = {k: v.to(engine.device) for k, v in batches.batch(step, micro_index).items()}
            loss = self.task.loss(engine, batch, groups)
            engine.backward(loss)
            if micro_index == last:
                compression = getattr(engine, "gradient_compression", None)
                if compression is not None:
                    compression.before_step(engine)  # ZeRO-0: the data-parallel mean
                if self.cfg.parallel.zero_stage == 0:
                    norm = grad_norm(engine, groups)  # before step() clips in place
                with self.events.phase("optimizer", step + 1):
                    engine.step()
                    if getattr(engine, "outer_sync", None) is not None:
                        engine.outer_sync.after_step(step + 1)
            else:
                engine.step()  # DeepSpeed counts micro-batches; it applies nothing before the boundary
            micro_losses.append(loss.detach())  # stays on the device: no host wait per micro-batch
        if norm is None:
            norm = grad_norm(engine, groups)
        (loss_sum,) = sum_over(groups.dp_group, torch.stack(micro_losses).double().mean())
        return loss_sum / groups.data, norm

    def eval_sums(self, eval_batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]
                  ) -> tuple[torch.Tensor | float, float]:
        device = self.engine.device
        total_nll, total_tokens = torch.zeros((), dtype=torch.float64, device=device), 0.0
        for batch, weight in eval_batches:
            nll, targets = self._row_nll({k: v.to(device) for k, v in batch.items()})
            total_nll += (nll.double() * weight.to(device)).sum()
            total_tokens += float(weight.sum()) * targets  # weight is the data's, on the host
        return total_nll, total_tokens

    def _row_nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(each row's summed next-token NLL over this rank's tokens, the targets per row it counts)."""
        groups, engine, input_ids, documents = self.groups, self.engine, batch["input_ids"], batch.get("position_ids")
        if groups.context == 1:
            extra = {} if documents is None else {"position_ids": documents}
            targets, count = next_token_targets(input_ids), input_ids.shape[1] - 1
            forward = lambda: engine(input_ids=input_ids, use_cache=False, **extra)  # noqa: E731
        else:
            ids, positions, targets = local_tokens(input_ids, input_ids, groups.cp_group, documents)
            # context rank 0 holds the last chunk, whose last token has no target
            count = ids.shape[1] - (groups.cp_rank == 0)
            forward = lambda: engine(input_ids=ids, position_ids=positions, use_cache=False)  # noqa: E731
        nll, _ = token_losses(engine.module, forward, targets, self.cfg.parallel.loss_chunk_tokens)
        return nll.sum(dim=1), count
