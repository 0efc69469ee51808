"""``parallel.partition: measured``: each pipeline item's forward + backward time, measured before the stages
are cut, and the cut that balances them.

An item is the embedding, one transformer block, or the final norm + head + loss. Each is probed on its own:
it runs forward and backward on a micro-batch of the run's shape a few times with random stand-ins for its
parameters (which are still on the meta device, and stay there), so a rank holds one item's weights at a time. Every rank probes every item (its tensor-parallel shard, with the collectives
the item does in training) and the times are averaged over all ranks, so every rank cuts the same stages.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from modeling.parallelize import vocab_slice
from modeling.pipeline import PipelineChunk, num_blocks
from parallel.comm import comm_device
from parallel.cross_entropy import causal_lm_loss
from parallel.partition import StageSpec

WARMUP, TIMED = 1, 3


def _probe(chunk: nn.Module, make_input, loss_of, device) -> float:
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


def measure(model: nn.Module, cfg, groups, device) -> dict[str, object]:
    """Seconds of forward + backward per item, averaged over every rank (collective):
    {'embed': s, 'blocks': [s, ...], 'head': s}."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout streams untouched
        embed, *blocks, head = _probe_items(model, cfg, groups, device)
    times = torch.tensor([embed, *blocks, head], dtype=torch.float64, device=comm_device())
    dist.all_reduce(times)
    times = (times / dist.get_world_size()).tolist()
    return {"embed": times[0], "blocks": times[1:-1], "head": times[-1]}


def _probe_items(model: nn.Module, cfg, groups, device) -> list[float]:
    """This rank's times of the embedding, each block, and the head + loss, on inputs of the run's shapes
    (with sequence parallelism the blocks after the first take this rank's part of the sequence)."""
    micro, seq, hidden = cfg.train.micro_batch_size, cfg.data.seq_len, model.config.hidden_size
    split = groups.tensor if cfg.parallel.sequence_parallel else 1
    generator = torch.Generator().manual_seed(cfg.train.seed)
    vocabulary = model.get_input_embeddings().num_embeddings

    def tokens():
        return torch.randint(0, vocabulary, (micro, seq), generator=generator).to(device)

    def hidden_state(length: int):
        return lambda: torch.randn(micro, length, hidden, generator=generator).to(device).requires_grad_()

    def mean_of(out):
        return out.float().mean()

    head_chunk, labels = PipelineChunk(model, StageSpec(range(0), head=True), seq), tokens()

    def loss_of(logits):
        start, valid = vocab_slice(head_chunk.head)
        return causal_lm_loss(logits, labels, groups.tp_group, start, valid)

    embed = _probe(PipelineChunk(model, StageSpec(range(0), embed=True), seq), tokens, mean_of, device)
    blocks = [_probe(PipelineChunk(model, StageSpec(range(i, i + 1)), seq),
                     hidden_state(seq if i == 0 else seq // split), mean_of, device) for i in range(num_blocks(model))]
    return [embed, *blocks, _probe(head_chunk, hidden_state(seq), loss_of, device)]


def block_weights(costs: dict[str, object]) -> list[int]:
    """Per-block integer weights (microseconds) for ``parallel.partition.balanced``: the embedding's time counts
    with the first block, the head's with the last (the chunks that hold them)."""
    weights = [float(s) for s in costs["blocks"]]
    weights[0] += float(costs["embed"])
    weights[-1] += float(costs["head"])
    return [max(1, round(w * 1e6)) for w in weights]
