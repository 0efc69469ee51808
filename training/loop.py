"""``run(cfg)``: the step loop of a run (steps, logging, eval and checkpoint cadence, skipped non-finite steps,
a stop signal turned into a saved checkpoint, the final Hugging Face export), over the parts
``training.assembly`` builds, telling its observers (``training.events``) of each phase."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from parallel import flight
from parallel.comm import comm_device
from parallel.groups import ProcessGroups
from training import checkpoint, elastic, host_memory
from training.assembly import Assembly, EditConfig, assemble
from training.config import RunConfig, for_world
from training.events import BuiltRun, Observer, Observers
from training.expert_load import ExpertLoad
from training.faults import (
    NonFiniteSteps,
    StopSignals,
    TrainingStopped,
    is_peer_lost,
    is_timeout,
    peer_lost_error,
    timeout_error,
)
from training.inputs import check_inputs, console
from training.lifecycle import init_distributed
from training.metrics import MetricsSink, SampleLog
from training.rank0 import on_rank0
from training.tasks import Task, task_for


@dataclass
class RunResult:
    """What a finished run returns to its caller (tests, benchmarks): every logged record."""

    history: list[dict[str, Any]] = field(default_factory=list)
    output_dir: Path | None = None
    engine: Any = None  # the DeepSpeed engine, for in-process callers that inspect the trained model
    groups: ProcessGroups | None = None
    model: Any = None  # the full HF model object (holding this rank's trained shards / stage)

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.history if "loss" in r]


def run(cfg: RunConfig, deepspeed_config_file: str | None = None, *, observers: Iterable[Observer] = (),
        edit_model_config: EditConfig | None = None) -> RunResult:
    """Train according to ``cfg``; collective over all ranks of the launched job. Nothing is written to
    ``train.output_dir`` until every check of the input has passed. ``observers`` are told of each phase;
    ``edit_model_config`` changes the HF config before the model is built (see ``assembly.build_model``)."""
    init_distributed(cfg.parallel.timeout_s)
    cfg = for_world(cfg, dist.get_world_size(), first_start=elastic.restart_count() == 0)
    task = task_for(cfg)
    inputs = check_inputs(cfg, task, deepspeed_config_file)
    host_memory.release_freed_tensors(comm_device().type, inputs.shard_bytes)  # before the model's tensors exist
    groups = ProcessGroups.from_degrees(cfg.parallel.tensor, cfg.parallel.pipeline, timeout_s=cfg.parallel.timeout_s,
                                        expert=cfg.parallel.expert, context=cfg.parallel.context)
    events = Observers(observers)
    parts = assemble(cfg, task, inputs, groups, events, edit_model_config)
    sink = MetricsSink(cfg.train.output_dir, dist.get_rank() == 0, cfg.logging.wandb,
                       {**cfg.to_dict(), "layout": groups.describe()},
                       resume_after_step=parts.start_step if parts.resumed else None)
    result = RunResult(output_dir=Path(cfg.train.output_dir), engine=parts.engine, groups=groups, model=parts.model)
    loop = Loop(cfg, task, parts, groups, result, sink, events)
    events.built(BuiltRun(cfg, parts.model, parts.engine, groups, loop.batches, parts.step))
    try:
        loop.run(parts.start_step)
    finally:
        sink.close()
        if loop.samples is not None:
            loop.samples.close()
    return result


def _sample_log(cfg: RunConfig, groups: ProcessGroups, start_step: int) -> SampleLog | None:
    """``train.log_sample_ids``: the log, holding the records up to ``start_step`` (collective)."""
    if not cfg.train.log_sample_ids:
        return None
    on_rank0(lambda: SampleLog.prepare(cfg.train.output_dir, start_step), "preparing the sample-id log")
    return SampleLog(cfg.train.output_dir, groups.sample_rank,
                     groups.tp_rank == 0 and groups.pp_rank == 0 and groups.cp_rank == 0)


class Loop:
    """The step loop of one run. ``operation`` names what it is doing (for errors)."""

    def __init__(self, cfg: RunConfig, task: Task, parts: Assembly, groups: ProcessGroups, result: RunResult,
                 sink: MetricsSink, events: Observers):
        self.cfg, self.task, self.groups, self.result, self.sink, self.events = cfg, task, groups, result, sink, events
        self.engine, self.model, self.step_impl, self.tokenizer = parts.engine, parts.model, parts.step, parts.tokenizer
        self.valid_blocks = parts.valid_blocks
        resumed, plan = parts.resumed, parts.plan
        # Samples already seen: the data order continues where it stopped even if the global batch changed.
        self.sample_offset = resumed.consumed_samples - parts.start_step * plan.global_batch if resumed else 0
        self.batches = data_batches(cfg, task, parts, groups, self.sample_offset)
        self.tokens_per_step = task.tokens_per_step(plan)
        self.samples = _sample_log(cfg, groups, parts.start_step)
        self.nonfinite = NonFiniteSteps(cfg.train.max_consecutive_skips, resumed.skipped_steps if resumed else 0)
        self.operation = "setup"
        self.last_saved: Path | None = None
        self.background = checkpoint.BackgroundSave() if cfg.train.async_save else None
        self.expert_load = ExpertLoad(self.model, groups, cfg.parallel.sequence_parallel)

    def run(self, start_step: int) -> None:
        """Train, export, and say where the results are; a collective timeout names what was running."""
        cfg, out = self.cfg, Path(self.cfg.train.output_dir)
        try:
            with self.events.phase("train", start_step):
                self.train(start_step)
                self.finish_saves()
            if cfg.train.export_hf:
                self.operation = "the final Hugging Face export"
                with self.events.phase("export", cfg.train.steps):
                    checkpoint.export_hf(self.engine, self.model, self.tokenizer, out / "hf", self.groups,
                                         cfg.train.export_max_shard_size)
        except Exception as exc:
            if is_timeout(exc):
                raise timeout_error(exc, dist.get_rank(), cfg.parallel.timeout_s, self.operation) from exc
            if is_peer_lost(exc):
                raise peer_lost_error(exc, dist.get_rank(), self.operation) from exc
            raise
        written = [f"metrics {out / 'metrics.jsonl'}"]
        if self.last_saved is not None:
            written.append(f"checkpoint {self.last_saved}")
        if cfg.train.export_hf:
            written.append(f"Hugging Face export {out / 'hf'}")
        console(f"done: {cfg.train.steps} steps; " + "; ".join(written))

    def train(self, start_step: int) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        progress = tqdm(total=cfg.train.steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0,
                        disable=dist.get_rank() != 0 or not cfg.train.progress)
        if cfg.train.eval_first and start_step == 0 and self.valid_blocks is not None:
            self.evaluate(progress, 0)
        with StopSignals() as signals:
            for step in range(start_step, cfg.train.steps):
                record = self.step(step)
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}", step_s=f"{record['step_time_s']:.2f}")
                done = step + 1 == cfg.train.steps
                if self.valid_blocks is not None and (done or (cfg.train.eval_every
                                                               and (step + 1) % cfg.train.eval_every == 0)):
                    self.evaluate(progress, step + 1)
                saved = None
                if (done and cfg.train.save_final) or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
                    saved = self.save(step + 1)
                self.operation = f"the stop-signal check after step {step + 1}"
                signum = signals.requested()
                if signum and not done:
                    saved = saved or self.save(step + 1)
                    self.finish_saves()
                    name = signal.Signals(signum).name
                    raise TrainingStopped(f"stopped by {name} after step {step + 1}; complete checkpoint in {saved}; "
                                          f"continue with --set train.resume=auto", exit_code=128 + signum)
        self.synchronise(cfg.train.steps)
        progress.close()

    def step(self, step: int) -> dict[str, Any]:
        """Training step ``step + 1``, its record logged (every ``log_every``, the last and skipped ones)."""
        self.operation = f"training step {step + 1} (forward, backward, gradient reduction, optimizer step)"
        self.events.start("step", step + 1)
        started = time.perf_counter()
        lr = self.engine.get_lr()[0]
        self.expert_load.start_step()
        sent_before = flight.sent_over(flight.installed(), self.groups.dp_ranks)
        mean_loss, grad_norm = self.step_impl.train(self.batches, step)
        elapsed = time.perf_counter() - started
        record = {"step": step + 1, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": elapsed,
                  **self.expert_load.summary()}
        if self.groups.data > 1:  # bytes this rank sent over its data-parallel group in the step (host counters)
            record["dp_bytes_sent"] = flight.sent_over(flight.installed(), self.groups.dp_ranks) - sent_before
        if self.tokens_per_step is not None:
            record["tokens_per_s"] = self.tokens_per_step / elapsed
        if not self.engine.was_step_applied():
            record["skipped"] = True
        record["skipped_steps"] = self.nonfinite.total + ("skipped" in record)
        self.events.end("step", step + 1, record)
        if self.samples is not None:
            ids = [i for micro in range(self.cfg.train.grad_accum) for i in self.batches.ids(step, micro)]
            self.samples.record(step + 1, ids, elastic.restart_count())
        if (step + 1) % self.cfg.train.log_every == 0 or step + 1 == self.cfg.train.steps or "skipped" in record:
            self._log(record)
        self.nonfinite.record(step + 1, "skipped" not in record, record["loss"], record["grad_norm"])
        return record

    def _log(self, record: dict[str, Any]) -> None:
        self.sink.log(record)
        self.result.history.append(record)

    def save(self, step: int) -> Path:
        """Save the checkpoint of ``step`` and log how long the step loop waited for it (``checkpoint_s``:
        the whole save, or with ``train.async_save`` the copy to host memory and any wait for the previous)."""
        self.operation = f"the checkpoint save of step {step}"
        started = time.perf_counter()
        self.synchronise(step)
        consumed = self.sample_offset + step * self.batches.plan.global_batch
        with self.events.phase("save", step):
            self.last_saved = checkpoint.save(self.engine, self.model, self.tokenizer, self.groups,
                                              self.cfg.to_dict(), step, consumed, self.cfg.train.output_dir,
                                              self.background, self.cfg.parallel.timeout_s)
        self._log({"step": step, "checkpoint_s": time.perf_counter() - started})
        return self.last_saved

    def finish_saves(self) -> None:
        """Wait for the checkpoint being written in the background (``train.async_save``), if any."""
        if self.background is not None and self.background.in_flight is not None:
            self.operation = f"the background write of the checkpoint of step {self.background.in_flight}"
            self.background.wait()

    def synchronise(self, step: int) -> None:
        """``parallel.sync_every``: the replicas agree before the model is evaluated, saved or exported."""
        if getattr(self.engine, "outer_sync", None) is not None:
            self.engine.outer_sync.before_save(step)

    def evaluate(self, progress: Any, step: int) -> None:
        self.operation = f"the evaluation at step {step}"
        self.synchronise(step)
        self.events.start("eval", step)
        scores = self.task.evaluate(self.step_impl, self.engine, self.valid_blocks, self.groups, self.tokenizer)
        metrics = {"step": step, **scores}
        self.events.end("eval", step, metrics)
        self._log(metrics)
        if dist.get_rank() == 0:
            bleu = f" BLEU {metrics['bleu']:.2f} ({metrics['bleu_signature']})" if "bleu" in metrics else ""
            progress.write(f"step {step}: eval_loss {metrics['eval_loss']:.4f} "
                           f"perplexity {metrics['perplexity']:.2f}{bleu}")


def data_batches(cfg: RunConfig, task: Task, parts: Assembly, groups: ProcessGroups, sample_offset: int) -> Any:
    """This data-parallel rank's training micro-batches, continuing the data order after ``sample_offset``."""
    from training.data import TrainBatches

    return TrainBatches(parts.train_blocks, parts.plan, groups.sample_rank, cfg.train.seed,
                        pad_id=task.pad_id(parts.tokenizer), sample_offset=sample_offset,
                        document_eos=parts.tokenizer.eos_token_id if cfg.data.separate_documents else None)
