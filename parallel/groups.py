"""Process groups for 3D parallelism: tensor (TP) x pipeline (PP) x data (DP), experts (EP) carved from DP.

Ranks are laid out as ``arange(world).view(pp, dp, tp)``: tensor-parallel ranks are adjacent (they talk
most, so they share a node), data-parallel ranks come next and pipeline stages are furthest apart, as in
Megatron-LM's default order. Expert parallelism splits each data-parallel group into groups of ``expert``
adjacent ranks (EP: they exchange tokens by all-to-all) and the ranks at the same place in each of them (EDP:
they hold the same experts and reduce their gradients), as Megatron-Core carves EP from DP. Context parallelism
is carved the same way: groups of ``context`` adjacent data-parallel ranks (CP) each hold 1/context of every
sequence of the same samples, and the data-parallel group stays the group gradients are reduced and ZeRO
partitions over (Megatron's DP x CP group): ``data`` counts its ranks, ``replicas`` the different sample
streams (``data // context``) and ``sample_rank`` this rank's stream. One
``ProcessGroups`` object holds every group of this rank; it is passed explicitly and also answers the ``mpu``
calls DeepSpeed makes, so ZeRO shards and reduces over the data-parallel group only and gradient norms are
taken over the model-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


def rank_grid(tensor: int, pipeline: int, data: int) -> torch.Tensor:
    """The rank grid indexed ``[pp_rank, dp_rank, tp_rank]``."""
    return torch.arange(tensor * pipeline * data).view(pipeline, data, tensor)


def check_degrees(tensor: int, pipeline: int, world_size: int, expert: int = 1, context: int = 1) -> int:
    """Return the data-parallel degree (context ranks included), or raise naming the degrees that do not fit the
    world size."""
    for name, degree in (("parallel.tensor", tensor), ("parallel.pipeline", pipeline), ("parallel.expert", expert),
                         ("parallel.context", context)):
        if degree < 1:
            raise ValueError(f"{name}={degree}: a parallel degree must be >= 1")
    model_parallel = tensor * pipeline
    if world_size % model_parallel:
        raise ValueError(
            f"parallel.tensor={tensor} x parallel.pipeline={pipeline} = {model_parallel} does not divide the "
            f"world size {world_size}: launch a multiple of {model_parallel} processes or change the degrees")
    data = world_size // model_parallel
    if data % expert:
        raise ValueError(f"parallel.expert={expert} does not divide the data-parallel degree {data} (world size "
                         f"{world_size} / tensor {tensor} x pipeline {pipeline}): expert-parallel ranks are carved "
                         f"from the data-parallel ones; launch a multiple of {model_parallel * expert} processes")
    if data % context:
        raise ValueError(f"parallel.context={context} does not divide the data-parallel degree {data} (world size "
                         f"{world_size} / tensor {tensor} x pipeline {pipeline}): context-parallel ranks are carved "
                         f"from the data-parallel ones; launch a multiple of {model_parallel * context} processes")
    return data


@dataclass
class ProcessGroups:
    """This rank's place in the (tp, pp, dp) grid and the groups it belongs to."""

    tensor: int
    pipeline: int
    data: int
    rank: int
    tp_group: dist.ProcessGroup | None = field(repr=False)
    pp_group: dist.ProcessGroup | None = field(repr=False)
    dp_group: dist.ProcessGroup | None = field(repr=False)
    mp_group: dist.ProcessGroup | None = field(repr=False)
    tp_ranks: list[int] = field(default_factory=list)
    pp_ranks: list[int] = field(default_factory=list)
    dp_ranks: list[int] = field(default_factory=list)
    mp_ranks: list[int] = field(default_factory=list)
    embed_group: dist.ProcessGroup | None = field(default=None, repr=False)  # first + last stage, for tied embeddings
    expert: int = 1
    ep_group: dist.ProcessGroup | None = field(default=None, repr=False)
    edp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    ep_ranks: list[int] = field(default_factory=list)
    edp_ranks: list[int] = field(default_factory=list)
    context: int = 1
    cp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    cp_ranks: list[int] = field(default_factory=list)

    @classmethod
    def from_degrees(cls, tensor: int = 1, pipeline: int = 1, data: int | None = None,
                     timeout_s: float | None = None, expert: int = 1, context: int = 1) -> "ProcessGroups":
        """Build every group of the grid (collectively: all ranks must call this in the same order). A
        collective on any of them waiting longer than ``timeout_s`` raises (torch's default otherwise)."""
        world = dist.get_world_size()
        dp = check_degrees(tensor, pipeline, world, expert, context)
        if data is not None and data != dp:
            raise ValueError(f"data-parallel degree {data} != world size {world} / (tensor {tensor} x "
                             f"pipeline {pipeline}) = {dp}")
        grid = rank_grid(tensor, pipeline, dp)
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        rank = dist.get_rank()
        mine: dict[str, tuple[dist.ProcessGroup | None, list[int]]] = {}
        candidates = {
            "tp": [grid[p, d, :].tolist() for p in range(pipeline) for d in range(dp)],
            "dp": [grid[p, :, t].tolist() for p in range(pipeline) for t in range(tensor)],
            "pp": [grid[:, d, t].tolist() for d in range(dp) for t in range(tensor)],
            "mp": [grid[:, d, :].flatten().tolist() for d in range(dp)],
            "embed": ([[grid[0, d, t].item(), grid[-1, d, t].item()] for d in range(dp) for t in range(tensor)]
                      if pipeline > 1 else []),
            "ep": [grid[p, k:k + expert, t].tolist() for p in range(pipeline) for t in range(tensor)
                   for k in range(0, dp, expert)] if expert > 1 else [],
            "edp": [grid[p, k::expert, t].tolist() for p in range(pipeline) for t in range(tensor)
                    for k in range(expert)] if expert > 1 else [],
            "cp": [grid[p, k:k + context, t].tolist() for p in range(pipeline) for t in range(tensor)
                   for k in range(0, dp, context)] if context > 1 else [],
        }
        for kind, rank_lists in candidates.items():
            for ranks in rank_lists:
                group = dist.new_group(ranks, timeout=timeout) if len(ranks) < world else dist.group.WORLD
                if rank in ranks:
                    mine[kind] = (group, ranks)
        return cls(tensor=tensor, pipeline=pipeline, data=dp, rank=rank,
                   tp_group=mine["tp"][0], pp_group=mine["pp"][0], dp_group=mine["dp"][0],
                   mp_group=mine["mp"][0], tp_ranks=mine["tp"][1], pp_ranks=mine["pp"][1],
                   dp_ranks=mine["dp"][1], mp_ranks=mine["mp"][1], embed_group=mine.get("embed", (None,))[0],
                   expert=expert, ep_group=mine.get("ep", (None,))[0], ep_ranks=mine.get("ep", (None, [rank]))[1],
                   edp_group=mine.get("edp", mine["dp"])[0], edp_ranks=mine.get("edp", mine["dp"])[1],
                   context=context, cp_group=mine.get("cp", (None,))[0], cp_ranks=mine.get("cp", (None, [rank]))[1])

    def describe(self) -> dict[str, int]:
        """The layout in numbers, for logs and run records."""
        layout = {"world_size": self.tensor * self.pipeline * self.data, "tensor": self.tensor,
                  "pipeline": self.pipeline, "data": self.replicas}
        return {**layout, **({"expert": self.expert} if self.expert > 1 else {}),
                **({"context": self.context} if self.context > 1 else {})}

    # --- coordinates -------------------------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return self.tp_ranks.index(self.rank)

    @property
    def pp_rank(self) -> int:
        return self.pp_ranks.index(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.dp_ranks.index(self.rank)

    @property
    def cp_rank(self) -> int:
        return self.cp_ranks.index(self.rank) if self.cp_ranks else 0

    @property
    def replicas(self) -> int:
        """Data-parallel ranks that see different samples (the context ranks of one group see the same)."""
        return self.data // self.context

    @property
    def sample_rank(self) -> int:
        """Which of the ``replicas`` sample streams this rank reads."""
        return self.dp_rank // self.context

    @property
    def ep_rank(self) -> int:
        return self.ep_ranks.index(self.rank)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pipeline - 1

    # --- the mpu interface DeepSpeed calls ---------------------------------------------------------
    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.data

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_ranks)

    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_rank(self) -> int:
        return self.mp_ranks.index(self.rank)

    def get_model_parallel_world_size(self) -> int:
        return self.tensor * self.pipeline

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tensor

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tp_ranks[0]

    def get_pipeline_model_parallel_group(self):
        return self.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pipeline

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    # DeepSpeed's "slice parallel" is the model-parallel slice a ZeRO checkpoint is saved per.
    get_slice_parallel_group = get_model_parallel_group
    get_slice_parallel_rank = get_model_parallel_rank
    get_slice_parallel_world_size = get_model_parallel_world_size
