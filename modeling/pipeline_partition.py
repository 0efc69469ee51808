"""Which blocks each pipeline stage holds, and this rank's chunks of a decoder.

The partition policy (``parallel.partition``): 'uniform' (equal block counts), 'parameters' (balanced by each
block's parameter count), 'measured' (balanced by each item's forward + backward time, measured before the stages
are cut), or an explicit partition string ('E,t,t|t,t,L', ``parallel.partition.parse_partition``). The cut itself
is ``parallel.partition``'s arithmetic; ``build_chunks`` hands back the partition it chose and, when measured,
the times, for the caller to record with the run.

Measured: an item is the embedding, one transformer block, or the final norm + head + loss. Each is probed on its
own: it runs forward and backward on a micro-batch of the run's shape a few times with random stand-ins for its
parameters (which are still on the meta device, and stay there), so a rank holds one item's weights at a time.
Every rank probes every item (its tensor-parallel shard, with the collectives the item does in training) and
the times are averaged over all ranks, so every rank cuts the same stages.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel

from modeling.losses import mean_loss, next_token_targets, token_losses
from modeling.pipeline import PipelineChunk, blocks_of, num_blocks, split_chunks
from parallel.comm import comm_device
from parallel.context import token_indices
from parallel.groups import ProcessGroups
from parallel.partition import StageSpec, chunks_of_rank, partition_string, stage_specs

WARMUP, TIMED = 1, 3  # probe runs per item: untimed, timed (the median counts)


@dataclass(frozen=True)
class PipelineSettings:
    """What the stage split reads from the run's settings: the sequence length and micro-batch size (the chunks'
    and the probes' input shape), ``parallel.partition`` and ``parallel.virtual_stages``, sequence parallelism
    (the blocks' input is a sequence shard), the seed of the probes' inputs, the ZeRO stage, and the loss's
    chunks (``parallel.loss_chunk_tokens``: the head's probe runs the loss as training does)."""

    seq_len: int
    micro_batch_size: int
    partition: str = "uniform"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    seed: int = 0
    zero_stage: int = 0
    loss_chunk_tokens: int = 0


@dataclass
class RankChunks:
    """This rank's chunks of the model, the weight it shares with the other end of the pipeline (tied input and
    output embeddings on the first and last stages; else None), every chunk's items as a partition string, and
    the measured seconds per item when ``parallel.partition`` is 'measured' (``measure``)."""

    chunks: nn.ModuleList
    tied_weight: nn.Parameter | None
    partition: str
    seconds: dict[str, Any] | None = None


def block_parameter_counts(model: PreTrainedModel) -> list[int]:
    """Each transformer block's parameter count: the weights of ``parallel.partition: parameters``."""
    return [sum(p.numel() for p in block.parameters()) for block in blocks_of(model)]


def choose_stages(model: PreTrainedModel, groups: ProcessGroups,
                  settings: PipelineSettings) -> tuple[list[StageSpec], dict[str, Any] | None]:
    """Every chunk's items by ``settings.partition``, and the measured seconds per item for 'measured' (which
    probes every item on every rank: collective), else None."""
    method, weights, seconds = settings.partition, None, None
    if method == "parameters":
        weights = block_parameter_counts(model)
    elif method == "measured":
        seconds = measure(model, groups, comm_device(), settings)
        weights = block_weights(seconds)
    specs = stage_specs(num_blocks(model), groups.pipeline, settings.virtual_stages, method, weights)
    return specs, seconds


def build_chunks(model: PreTrainedModel, groups: ProcessGroups, settings: PipelineSettings) -> RankChunks:
    """This rank's model chunks, with tied input/output embeddings prepared for the embedding group and, under
    ZeRO-3, the marks of its gradient norm."""
    specs, seconds = choose_stages(model, groups, settings)
    embeddings = cast(nn.Parameter, model.get_input_embeddings().weight)
    output = model.get_output_embeddings()
    tied = output is not None and embeddings is output.weight
    positions = (token_indices(settings.seq_len * groups.context, groups.cp_rank, groups.context)
                 if groups.context > 1 else None)
    chunks = split_chunks(model, chunks_of_rank(specs, groups.pipeline, groups.pp_rank), settings.seq_len, positions)
    tied_weight = None
    if tied and groups.pipeline > 1 and (groups.is_first_stage or groups.is_last_stage):
        tied_weight = embeddings
        if groups.is_last_stage:
            marked: Any = tied_weight  # DeepSpeed's mark: counted once (on the first stage) in the global norm
            marked.ds_pipe_replicated = True
    if settings.zero_stage == 3:
        _count_once_in_zero3_norm(chunks, groups)
    return RankChunks(chunks, tied_weight, partition_string(specs), seconds)


def _count_once_in_zero3_norm(chunks: nn.Module, groups: ProcessGroups) -> None:
    """ZeRO-3's gradient norm counts a parameter on every model-parallel rank (TP x PP) when it is marked
    ``model_parallel`` and on model-parallel rank 0 only otherwise: mark what this rank alone holds (every
    stage's own layers; tensor-parallel shards; replicated ones on tensor rank 0), not the last stage's tied
    copy."""
    for param in chunks.parameters():
        own = getattr(param, "tensor_model_parallel", False) or groups.tp_rank == 0
        if own and not getattr(param, "ds_pipe_replicated", False):
            marked: Any = param  # DeepSpeed's mark
            marked.model_parallel = True


class _HeadLoss(nn.Module):
    """The last chunk and its mean next-token loss of ``labels``, as one module for ``_probe``."""

    def __init__(self, chunk: PipelineChunk, labels: torch.Tensor, chunk_tokens: int):
        super().__init__()
        self.chunk, self.targets, self.chunk_tokens = chunk, next_token_targets(labels), chunk_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        losses, _ = token_losses(self.chunk.model, lambda: self.chunk(x), self.targets, self.chunk_tokens)
        return mean_loss(losses, self.targets)


def _probe(chunk: nn.Module, make_input: Callable[[], torch.Tensor], loss_of: Callable[[torch.Tensor], torch.Tensor],
           device: torch.device) -> float:
    """Median seconds of forward + backward of ``chunk``, run with random stand-ins for its (meta) parameters
    and buffers (``torch.func.functional_call``: the module itself, its tied weights and marks are untouched)."""
    values = {name: torch.empty(t.shape, dtype=t.dtype, device=device).normal_(0.0, 0.02).requires_grad_(
                  isinstance(t, nn.Parameter) and t.requires_grad)
              for name, t in [*chunk.named_parameters(), *chunk.named_buffers()]}
    seconds = []
    for attempt in range(WARMUP + TIMED):
        x = make_input()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss_of(torch.func.functional_call(chunk, values, (x,))).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if attempt >= WARMUP:
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure(model: PreTrainedModel, groups: ProcessGroups, device: torch.device,
            settings: PipelineSettings) -> dict[str, Any]:
    """Seconds of forward + backward per item, averaged over every rank (collective):
    {'embed': s, 'blocks': [s, ...], 'head': s}."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout streams untouched
        embed, *blocks, head = _probe_items(model, groups, device, settings)
    summed = torch.tensor([embed, *blocks, head], dtype=torch.float64, device=comm_device())
    dist.all_reduce(summed)
    times = (summed / dist.get_world_size()).tolist()
    return {"embed": times[0], "blocks": times[1:-1], "head": times[-1]}


def _probe_items(model: PreTrainedModel, groups: ProcessGroups, device: torch.device,
                 settings: PipelineSettings) -> list[float]:
    """This rank's times of the embedding, each block, and the head + loss, on inputs of the run's shapes
    (with sequence parallelism the blocks after the first take this rank's part of the sequence)."""
    micro, seq, hidden = settings.micro_batch_size, settings.seq_len, model.config.hidden_size
    split = groups.tensor if settings.sequence_parallel else 1
    generator = torch.Generator().manual_seed(settings.seed)
    vocabulary = model.get_input_embeddings().num_embeddings

    def tokens():
        return torch.randint(0, vocabulary, (micro, seq), generator=generator).to(device)

    def hidden_state(length: int):
        return lambda: torch.randn(micro, length, hidden, generator=generator).to(device).requires_grad_()

    def mean_of(out):
        return out.float().mean()

    head_loss = _HeadLoss(PipelineChunk(model, StageSpec(range(0), head=True), seq), tokens(),
                          settings.loss_chunk_tokens)
    embed = _probe(PipelineChunk(model, StageSpec(range(0), embed=True), seq), tokens, mean_of, device)
    blocks = [_probe(PipelineChunk(model, StageSpec(range(i, i + 1)), seq),
                     hidden_state(seq if i == 0 else seq // split), mean_of, device) for i in range(num_blocks(model))]
    return [embed, *blocks, _probe(head_loss, hidden_state(seq), lambda loss: loss, device)]


def block_weights(costs: dict[str, Any]) -> list[int]:
    """Per-block integer weights (microseconds) for ``parallel.partition.balanced``: the embedding's time counts
    with the first block, the head's with the last (the chunks that hold them)."""
    weights = [float(s) for s in costs["blocks"]]
    weights[0] += float(costs["embed"])
    weights[-1] += float(costs["head"])
    return [max(1, round(w * 1e6)) for w in weights]
