"""Baselines for the sweep, run under torchrun on the same model, data, batch and steps as a colonnade point:

- ``plain``: transformers + a torch AdamW loop, one process (what a user writes without a framework);
- ``ddp``: torch ``DistributedDataParallel`` (``no_sync`` during accumulation);
- ``deepspeed``: DeepSpeed ZeRO alone (``deepspeed.initialize`` on the unmodified HF model);
- ``pipelining``: ``torch.distributed.pipelining`` (GPipe or 1F1B) over the same stage modules colonnade
  runs, so the difference is the schedule executor and its communication. Its two ends keep untied copies of a
  tied embedding (torch's pipelining does not synchronize them); colonnade adds that all-reduce.

All use fp32 AdamW with the same learning-rate schedule and gradient clipping. Each process reports its
median optimizer-step time over the timed steps.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

KINDS = ("plain", "ddp", "deepspeed", "pipelining")


def _device():
    import os

    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _setup(cfg):
    import torch
    import torch.distributed as dist

    from modeling.build import build_model, byte_level_tokenizer, load_tokenizer
    from training import data

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    tok = byte_level_tokenizer() if cfg.model.tokenizer == "byte" else load_tokenizer(cfg.model.tokenizer)
    files = data.expand_files(cfg.data.train_files, "data.train_files")
    blocks = data.tokenize_and_pack(data.load_texts(files, "data.train_files", cfg.data.text_field, None), tok,
                                    cfg.data.seq_len, "data.train_files")
    model = build_model(pretrained=cfg.model.pretrained, arch=cfg.model.arch, config=dict(cfg.model.config),
                        vocab_size=len(tok), seed=cfg.train.seed).to(_device())
    return model, blocks, data.GlobalOrder(len(blocks), cfg.train.seed)


def _micro_batch(blocks, order, step: int, micro: int, index: int, size: int):
    start = step * size + index * micro
    return blocks[[order[i] for i in range(start, start + micro)]]["input_ids"].to(_device())


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _clip(parameters, max_norm: float, group=None) -> None:
    """Clip by the global norm, summed over ``group`` when the parameters are split across it."""
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    squared = torch.stack([g.pow(2).sum() for g in grads]).sum()
    if group is not None:
        dist.all_reduce(squared, group=group)
    coefficient = torch.clamp(max_norm / (squared.sqrt() + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coefficient)


def _update(parameters, max_norm: float, group, optimizer, scheduler) -> None:
    """Clip, step, schedule, zero the gradients, and wait for the device: the end of a timed step."""
    _clip(parameters, max_norm, group)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    _sync()


def run(kind: str, cfg, steps: int) -> list[float]:
    """Train ``steps`` optimizer steps; returns each step's wall time on this rank."""
    import torch
    import torch.distributed as dist

    from training.engine import build_optimizer

    model, blocks, order = _setup(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    micro, m = cfg.train.micro_batch_size, cfg.train.grad_accum
    clip = cfg.optim.grad_clip
    times = []

    if kind == "pipelining":
        return _run_pipelining(cfg, model, blocks, order, steps)
    dp_rank, dp = rank, world
    step_size = micro * m * dp
    if kind == "deepspeed":
        import deepspeed

        optimizer, scheduler = build_optimizer(model, cfg.optim, steps, cls=torch.optim.AdamW)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config={
            "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": m, "gradient_clipping": clip,
            "zero_optimization": {"stage": cfg.parallel.zero_stage}, "steps_per_print": 10**9,
            "bf16": {"enabled": cfg.precision == "bf16"},
            "wall_clock_breakdown": False}, dist_init_required=False)
        for step in range(steps):
            started = time.perf_counter()
            for k in range(m):
                ids = _micro_batch(blocks, order, step, micro, dp_rank * m + k, step_size)
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()
            _sync()
            times.append(time.perf_counter() - started)
        return times

    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif world != 1:
        raise ValueError(f"the plain baseline runs in one process, not {world}")
    optimizer, scheduler = build_optimizer(model, cfg.optim, steps, cls=torch.optim.AdamW)
    for step in range(steps):
        started = time.perf_counter()
        for k in range(m):
            ids = _micro_batch(blocks, order, step, micro, dp_rank * m + k, step_size)
            sync = kind == "plain" or k == m - 1
            with model.no_sync() if not sync else _null():  # backward inside: that is where DDP reduces
                with _autocast(cfg):
                    loss = model(input_ids=ids, labels=ids).loss / m
                loss.backward()
        _update(list(model.parameters()), clip, None, optimizer, scheduler)
        times.append(time.perf_counter() - started)
    return times


def _autocast(cfg):
    import torch

    return torch.autocast(_device().type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def _null():
    import contextlib

    return contextlib.nullcontext()


def _run_pipelining(cfg, model, blocks, order, steps: int) -> list[float]:
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from modeling.pipeline import num_blocks, split_chunks
    from modeling.pipeline_partition import block_parameter_counts
    from parallel.partition import stage_specs
    from training.engine import build_optimizer

    rank, p = dist.get_rank(), dist.get_world_size()
    micro, m = cfg.train.micro_batch_size, cfg.train.grad_accum
    weights = block_parameter_counts(model) if cfg.parallel.partition == "parameters" else None
    spec = stage_specs(num_blocks(model), p, 1, cfg.parallel.partition, weights)[rank]
    (chunk,) = split_chunks(model, [spec], cfg.data.seq_len)
    stage = PipelineStage(chunk, rank, p, _device())

    def loss_fn(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    schedule_cls = ScheduleGPipe if cfg.parallel.schedule == "gpipe" else Schedule1F1B
    schedule = schedule_cls(stage, n_microbatches=m, loss_fn=loss_fn)
    optimizer, scheduler = build_optimizer(chunk, cfg.optim, steps, cls=torch.optim.AdamW)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        ids = torch.cat([_micro_batch(blocks, order, step, micro, k, micro * m) for k in range(m)])
        if rank == 0:
            schedule.step(ids)
        elif rank == p - 1:
            schedule.step(target=ids, losses=[])
        else:
            schedule.step()
        _update(list(chunk.parameters()), cfg.optim.grad_clip, dist.group.WORLD, optimizer, scheduler)
        times.append(time.perf_counter() - started)
    return times


def worker(args) -> None:
    import torch.distributed as dist

    from training.config import load
    from training.lifecycle import finish_process

    cfg = load(args.config, args.set)
    times = run(args.baseline, cfg, cfg.train.steps)
    step_s = statistics.median(times[args.warmup:args.warmup + args.timed])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, step_s)
    if dist.get_rank() == 0:
        Path(args.out_file).write_text(json.dumps({"step_s": max(gathered)}))
    finish_process()
