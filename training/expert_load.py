"""Tokens per expert of every mixture-of-experts layer in a training step, for ``metrics.jsonl`` and W&B.

Each experts module counts the experts its router chose for the tokens it is given (a forward pre-hook; a
forward that activation recomputation repeats inside the backward is not counted again). At the end of the step
the counts are summed over the ranks that routed different tokens (data-parallel ranks, tensor ranks under
sequence parallelism, the pipeline stages holding the layers) in one all-reduce, and each layer is summarised by
its least and most loaded expert and the coefficient of variation of the load (std / mean; 0 = balanced).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from modeling.experts import experts_modules
from parallel.comm import comm_device
from parallel.groups import ProcessGroups


class ExpertLoad:
    def __init__(self, model: nn.Module, groups: ProcessGroups, sequence_parallel: bool):
        modules = experts_modules(model)
        self.names = [_layer_name(name) for name in modules]
        self.sizes = [getattr(m, "total_experts", m.num_experts) for m in modules.values()]
        self.counts = torch.zeros(len(modules), max(self.sizes, default=0), device=comm_device())
        self.counted = sequence_parallel or groups.tp_rank == 0  # without SP every tensor rank routes the same
        for row, module in enumerate(modules.values()):
            module.register_forward_pre_hook(self._counter(row), with_kwargs=True)

    def _counter(self, row: int) -> Any:
        def count(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if torch._C._current_graph_task_id() != -1:  # a recomputation inside the backward
                return
            chosen = (args[1] if len(args) > 1 else kwargs["top_k_index"]).reshape(-1)
            self.counts[row, :self.sizes[row]] += torch.bincount(chosen, minlength=self.sizes[row]).to(self.counts)

        return count

    def start_step(self) -> None:
        self.counts.zero_()

    def summary(self) -> dict[str, float]:
        """The step's per-layer load (collective over all ranks): ``moe/<layer>/tokens_min``, ``tokens_max``,
        ``tokens_cv``."""
        if not self.names:
            return {}
        counts = self.counts if self.counted else torch.zeros_like(self.counts)
        dist.all_reduce(counts)
        record = {}
        for name, size, row in zip(self.names, self.sizes, counts.double().cpu()):
            load = row[:size]
            record[f"moe/{name}/tokens_min"] = float(load.min())
            record[f"moe/{name}/tokens_max"] = float(load.max())
            record[f"moe/{name}/tokens_cv"] = float(load.std(unbiased=False) / load.mean()) if load.sum() else 0.0
        return record


def _layer_name(module_name: str) -> str:
    """``model.layers.3.mlp.experts`` -> ``layer_3``."""
    found = re.search(r"\.(\d+)\.", module_name)
    return f"layer_{found.group(1)}" if found else module_name
