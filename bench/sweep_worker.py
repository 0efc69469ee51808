"""One grid point of ``bench sweep``, inside each of its torchrun processes: train the point's run with the
sweep's observer (``StepObserver``) and the communication probe (``bench.instrument``), then gather every rank's
per-step medians and memory to rank 0, which writes them for the sweep to summarize.

Events used: ``on_built`` (the engine, whose gradients and optimizer state are measured), ``step`` (each step's
wall time and the probe's totals over it; the steps after the timed ones put a barrier before each collective)
and ``optimizer`` (its seconds, and the gradient storage before it). The gradient storage after every backward
is counted on DeepSpeed's own ``DeepSpeedEngine.backward``: no event marks a micro-batch's backward."""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

from training.events import Observer


def _optimizer_state_bytes(optimizer, experts_only: bool = False) -> int:
    """Bytes of the optimizer's state tensors (``experts_only``: of DeepSpeed's MoE parameter groups)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(t.numel() * t.element_size() for group in inner.param_groups
               if group.get("moe", False) or not experts_only
               for p in group["params"] for t in inner.state.get(p, {}).values()
               if hasattr(t, "numel") and t.dim() > 0)


def _param_bytes(module) -> int:
    """Bytes of parameters this rank holds between steps: its ZeRO-3 partitions (``ds_tensor``, with their
    padding), else the tensors themselves."""
    return sum(t.numel() * t.element_size() for t in (getattr(p, "ds_tensor", p) for p in module.parameters()))


def _gradient_bytes(engine) -> int:
    """Bytes of gradient storage this rank holds now: the parameters' ``.grad`` (ZeRO-0/1 accumulate full
    gradients there between steps) and DeepSpeed's partitioned gradient buffers (ZeRO-2 frees ``.grad`` after
    reducing each bucket into its partition); each storage counted once."""
    import torch

    optimizer = engine.optimizer
    # ``grad_accum``: where DeepSpeed accumulates under unmanaged gradient accumulation (our pipelines)
    tensors = [g for p in engine.module.parameters() for g in (p.grad, getattr(p, "grad_accum", None))
               if isinstance(g, torch.Tensor)]
    partitioned = getattr(optimizer, "grads_in_partition", None)
    if isinstance(partitioned, torch.Tensor):
        tensors.append(partitioned)
    else:
        for value in (getattr(optimizer, "averaged_gradients", None) or {}).values():
            tensors.extend(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, torch.Tensor))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class StepObserver(Observer):
    """Per training step: its wall time and the probe's per-step totals (``per_step``), the optimizer phase's
    seconds added to the probe, and the gradient storage before each optimizer step (``gradient_bytes``; the
    peak is what the formula bounds). The steps after ``barrier_after`` put a barrier before each collective, to
    split the time spent waiting for the slowest rank from the transfer itself."""

    def __init__(self, probe, barrier_after: int):
        self.probe, self.barrier_after = probe, barrier_after
        self.per_step: list[dict] = []
        self.gradient_bytes: list[int] = []
        self.engine = None
        self._before: dict = {}
        self._started = {}

    def on_built(self, run) -> None:
        self.engine = run.engine

    def on_phase_start(self, phase: str, step: int) -> None:
        if phase == "step":
            self.probe.barrier = len(self.per_step) >= self.barrier_after
            self._before = self.probe.snapshot()
        elif phase == "optimizer":
            self.gradient_bytes.append(_gradient_bytes(self.engine))
        self._started[phase] = time.perf_counter()

    def on_phase_end(self, phase: str, step: int, record) -> None:
        from bench.instrument import StepProbe

        seconds = time.perf_counter() - self._started.pop(phase, time.perf_counter())
        if phase == "optimizer":
            self.probe.add("optimizer", seconds)
        elif phase == "step":
            self.per_step.append({"wall_s": seconds, **StepProbe.since(self._before, self.probe.snapshot())})


def _count_backward_gradient_bytes(counts: list[int]) -> None:
    """The gradient storage after every backward, appended to ``counts`` (DeepSpeed's own method wrapped)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original_backward = DeepSpeedEngine.backward

    def backward_then_count(engine, *a, **k):
        out = original_backward(engine, *a, **k)
        counts.append(_gradient_bytes(engine))
        return out

    DeepSpeedEngine.backward = backward_then_count


def worker(args) -> None:
    import torch.distributed as dist

    from bench.instrument import StepProbe, install
    from training import run
    from training.config import load
    from training.lifecycle import finish_process, init_distributed

    cfg = load(args.config, args.set)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    fits = json.loads(Path(args.comm_fit).read_text())["fit"] if args.comm_fit else None
    probe = StepProbe(cfg.parallel.tensor, cfg.parallel.pipeline, world, rank, fits, cfg.parallel.expert)
    install(probe)
    observer = StepObserver(probe, barrier_after=args.warmup + args.timed)
    _count_backward_gradient_bytes(observer.gradient_bytes)
    result = run(cfg, observers=[observer])
    summary = {"rank": rank, **_step_medians(observer.per_step, args.warmup, args.timed),
               **_rank_memory(result.engine, cfg, observer.gradient_bytes)}
    gathered = [None] * world
    dist.all_gather_object(gathered, summary)
    if rank == 0:
        Path(args.out_file).write_text(json.dumps({"ranks": gathered, "history": result.history}))
    finish_process()


def _step_medians(per_step: list[dict], warmup: int, timed: int) -> dict:
    """Medians over the timed steps (and, for the barrier-separated transfer and wait, the probe steps)."""
    timed_steps = per_step[warmup:warmup + timed]
    probed = per_step[warmup + timed:] or timed_steps
    groups = ("comm_tp", "comm_dp", "comm_pp", "comm_ep")

    def median(steps, kind, key, default=0.0):
        return statistics.median(s[kind].get(key, default) for s in steps)

    return {"step_s": statistics.median(s["wall_s"] for s in timed_steps),
            **{f"{k}_s": median(timed_steps, "seconds", k)
               for k in ("forward", "backward", "optimizer", "comm_tp", "comm_dp", "comm_pp", "comm_ep", "comm_other")},
            **{f"{k}_bytes": median(timed_steps, "bytes", k, 0) for k in groups},
            **{f"{k}_calls": median(timed_steps, "calls", k, 0) for k in groups},
            **{f"{k}_transfer_s": median(probed, "seconds", k) for k in groups},
            **{f"{k}_wait_s": median(probed, "wait", k) for k in groups},
            **{f"{k}_predicted_s": median(probed, "predicted", k) for k in groups}}


def _rank_memory(engine, cfg, gradient_bytes: list[int]) -> dict:
    import torch

    params = engine.module.parameters()
    local_params = sum((getattr(p, "ds_numel", p.numel()) if cfg.parallel.zero_stage == 3 else p.numel())
                       for p in params)
    return {
        "model_params_local": local_params,
        "param_bytes": _param_bytes(engine.module),
        "optimizer_state_bytes": _optimizer_state_bytes(engine.optimizer),
        "expert_param_bytes": sum(p.numel() * p.element_size() for p in engine.module.parameters()
                                  if hasattr(p, "expert_range")),
        "expert_optimizer_state_bytes": _optimizer_state_bytes(engine.optimizer, experts_only=True),
        # None where no gradient storage was found (ZeRO-2 under unmanaged accumulation, i.e. our pipelines,
        # keeps it in DeepSpeed buffers this probe does not know)
        "gradient_bytes": max(gradient_bytes) if gradient_bytes and max(gradient_bytes) else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
