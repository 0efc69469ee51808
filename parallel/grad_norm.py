"""The global gradient norm over tensor, pipeline and data parallel ranks, each parameter counted once."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from parallel.comm import comm_device


def global_grad_norm(parameters: Iterable[torch.Tensor], model_parallel_group: ProcessGroup | None,
                     tensor_rank: int) -> torch.Tensor:
    """L2 norm of all gradients of the model, a 0-dim float64 tensor on the group's device (read it once per
    step). Gradients are assumed already reduced over the data-parallel group. A sharded parameter
    (``tensor_model_parallel``) contributes its shard on every rank; a replicated one only on tensor rank 0
    of its stage; a copy marked ``ds_pipe_replicated`` (the last stage's tied embedding) not at all. The sum
    runs over the model-parallel (TP x PP) group: the same rules as DeepSpeed's clipping."""
    total = torch.zeros((), dtype=torch.float64, device=comm_device(model_parallel_group))
    for p in parameters:
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        if getattr(p, "tensor_model_parallel", False) or tensor_rank == 0:
            total += p.grad.detach().double().pow(2).sum().to(total.device)
    if model_parallel_group is not None and dist.get_world_size(model_parallel_group) > 1:
        dist.all_reduce(total, group=model_parallel_group)
    return total.sqrt()
