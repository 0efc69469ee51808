"""``run(cfg)``: set up the process groups, tokenizer, data, model and DeepSpeed engine, then the step
loop with eval, logging, checkpoints and the final Hugging Face export."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
import socket
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from transformers import set_seed

from modeling import recompute
from modeling.build import (
    auto_class,
    byte_level_tokenizer,
    check_sequence_fits,
    describe,
    hf_config,
    load_tokenizer,
    model_config,
    parameter_count,
    train_bpe_tokenizer,
    weights_source,
)
from modeling.materialize import empty_model, materialize
from modeling.parallelize import lm_loss, next_token_losses, tensor_parallelize
from modeling.pipeline import check_pipeline_fits
from modeling.tp_plans import check_tensor_parallel_fits
from parallel.comm import comm_device
from parallel.flight import FlightRecorder
from parallel.grad_norm import global_grad_norm
from parallel.groups import ProcessGroups
from training import checkpoint, data, elastic, host_memory, run_dir, seq2seq
from training import engine as engine_lib
from training.background_save import BackgroundSave
from training.config import ConfigError, RunConfig, deepspeed_config, for_world, load_user_deepspeed_config
from training.describe import layout
from training.faults import (
    NonFiniteSteps,
    StopSignals,
    TrainingStopped,
    is_peer_lost,
    is_timeout,
    peer_lost_error,
    timeout_error,
)
from training.metrics import MetricsSink, SampleLog, perplexity, sum_over
from training.pipeline import PipelineRunner, build_chunks
from training.rank0 import on_rank0, rank0_first


@dataclass
class RunResult:
    """What a finished run returns to its caller (tests, benchmarks): every logged record."""

    history: list[dict[str, Any]] = field(default_factory=list)
    output_dir: Path | None = None
    engine: Any = None  # the DeepSpeed engine, for in-process callers that inspect the trained model
    groups: ProcessGroups | None = None
    model: Any = None  # the full HF model object (holding this rank's trained shards / stage)
    runner: Any = None  # the PipelineRunner when parallel.pipeline > 1

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.history if "loss" in r]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the process group the launcher describes (torchrun / deepspeed set RANK, WORLD_SIZE, ...);
    a plain ``python train.py`` becomes a world of one. gloo on CPU, NCCL on CUDA. A collective waiting
    longer than ``timeout_s`` raises instead of hanging."""
    if dist.is_initialized():
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    # torch 2.13 deprecates the names DeepSpeed's ZeRO and our TP layers call (renamed *_single; torch >= 2.4
    # must keep working): not the user's business.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    elastic.init_process_group(accel.communication_backend_name(), timeout.get("timeout"))
    with contextlib.redirect_stdout(io.StringIO()):  # "DeepSpeed ... shm_comm_op built successfully", per rank
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False,
                                   **timeout)
    FlightRecorder().install()  # names the rank that is behind when a collective times out


def check_task_fits(cfg: RunConfig, model_config) -> None:
    """Sequence-to-sequence data needs an encoder-decoder model and the other way round."""
    encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
    if cfg.data.source_field and not encoder_decoder:
        raise ConfigError(f"data.source_field={cfg.data.source_field!r} makes this a sequence-to-sequence run, "
                          f"but model_type {model_config.model_type!r} is decoder-only; use an encoder-decoder "
                          f"model (t5, marian, bart) or remove data.source_field / data.target_field")
    if encoder_decoder and not cfg.data.source_field:
        raise ConfigError(f"model_type {model_config.model_type!r} is an encoder-decoder model: set "
                          f"data.source_field and data.target_field to the columns of the source and target text")


def shutdown_distributed() -> None:
    """Leave the process group once every rank is done; exiting with gloo's threads still running can abort
    a process ("terminate called without an active exception") after the work finished."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finish_process(code: int = 0) -> None:
    """End a launched process after its work is done and written: leave the process group, flush, and exit
    without the interpreter's shutdown, where native threads (gloo's, DeepSpeed's CPU communication op) can
    abort a finished process ("terminate called without an active exception") and fail a good run."""
    import sys

    if code == 0:
        shutdown_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def build_tokenizer(cfg: RunConfig, train_files: list[str], resume_from: Path | None = None,
                    start_over: bool = False):
    """The run's tokenizer: the one saved in ``output_dir/tokenizer`` by an earlier start of this run (unless this
    start begins again over it), else a resumed checkpoint's, else what ``model.tokenizer`` says. A directory is
    read by every rank (rank 0 first); a BPE is trained on rank 0 and sent to the others. Nothing is written
    here (``_save_run_files`` does, once every input check has passed)."""
    choice = cfg.model.tokenizer or (cfg.model.pretrained if cfg.model.pretrained else "byte")
    saved = [d for d in (None if start_over else Path(cfg.train.output_dir) / "tokenizer", resume_from)
             if d is not None and (d / "tokenizer_config.json").is_file()]
    directory = saved[0] if saved else (None if choice in ("byte", "bpe") else Path(choice))
    if directory is not None:
        def load():
            if not directory.is_dir():
                raise FileNotFoundError(f"model.tokenizer={choice}: not 'byte', 'bpe' or a tokenizer directory")
            return load_tokenizer(directory, cfg.model.trust_remote_code)

        return rank0_first(load, "loading the tokenizer")
    if choice == "byte":
        return byte_level_tokenizer()
    trained = on_rank0(lambda: train_bpe_tokenizer(_tokenizer_texts(cfg, train_files), cfg.model.bpe_vocab_size),
                       "training the BPE tokenizer")
    shared = [trained]
    dist.broadcast_object_list(shared, src=0)  # a tokenizers-backed object: pickles whole, no files behind it
    return shared[0]


def _tokenizer_texts(cfg: RunConfig, train_files: list[str]):
    if cfg.data.source_field:
        pairs = data.load_pairs(train_files, "data.train_files", cfg.data.source_field, cfg.data.target_field,
                                cfg.data.cache_dir)
        return (text for row in pairs for text in (row["source"], row["target"]))
    texts = data.load_texts(train_files, "data.train_files", cfg.data.text_field, cfg.data.cache_dir)
    return (row["text"] for row in texts)


def build_data(cfg: RunConfig, tokenizer, train_files: list[str], valid_files: list[str], fresh_start: bool = True):
    """The packed training and validation blocks (made on rank 0 first, then read from the cache); the
    tokenize and pack bars only on rank 0 of a fresh start with ``train.progress``."""
    def make():
        blocks = {}
        for key, files in (("data.train_files", train_files), ("data.valid_files", valid_files)):
            if files and cfg.data.source_field:
                pairs = data.load_pairs(files, key, cfg.data.source_field, cfg.data.target_field, cfg.data.cache_dir)
                blocks[key] = data.tokenize_pairs(pairs, tokenizer, cfg.data.seq_len, cfg.data.max_target_len, key)
            elif files:
                texts = data.load_texts(files, key, cfg.data.text_field, cfg.data.cache_dir)
                blocks[key] = data.tokenize_and_pack(texts, tokenizer, cfg.data.seq_len, key)
        return blocks

    with data.datasets_progress(cfg.train.progress and fresh_start and dist.get_rank() == 0):
        blocks = rank0_first(make, "tokenizing the data")
    return blocks["data.train_files"], blocks.get("data.valid_files")


@torch.no_grad()
def evaluate(model_engine, runner, blocks, cfg: RunConfig, groups: ProcessGroups) -> dict[str, float]:
    """Token-weighted mean NLL over the validation blocks, sharded over data-parallel ranks."""
    model_engine.eval()
    device = model_engine.device
    total_nll, total_tokens = torch.zeros((), dtype=torch.float64, device=device), 0.0
    batches = data.eval_batches(blocks, cfg.train.micro_batch_size, groups.dp_rank, groups.data,
                                cfg.train.eval_batches)
    if runner is not None:
        total_nll, total_tokens = runner.eval_sums(batches)
        batches = []
    for batch, weight in batches:
        input_ids = batch["input_ids"].to(device)
        logits = model_engine(input_ids=input_ids).logits
        nll = next_token_losses(model_engine.module, logits, input_ids, groups.tp_group).sum(dim=1)
        total_nll += (nll.double() * weight.to(device)).sum()
        total_tokens += float(weight.sum()) * (input_ids.shape[1] - 1)  # weight is the data's, on the host
    model_engine.train()
    total_nll, total_tokens = sum_over(groups.dp_group, total_nll, total_tokens)
    mean = total_nll / max(total_tokens, 1.0)
    return {"eval_loss": mean, "perplexity": perplexity(mean)}


def _grad_norm(model_engine, groups: ProcessGroups) -> float | None:
    norm = model_engine.get_global_grad_norm()
    if norm is None:  # ZeRO-0 in fp32 clips inside DeepSpeed without keeping the norm
        norm = global_grad_norm(model_engine.module.parameters(), groups.mp_group, groups.tp_rank)
    return float(norm)


@dataclass(frozen=True)
class _Inputs:
    """What the checks of a run's input found, before anything is built or written."""

    ds_config: dict[str, Any]
    train_files: list[str]
    valid_files: list[str]
    resume_from: Path | None
    start_over: bool  # from step 0 over an earlier run's files, which ``run_dir.claim`` moves aside
    shard_bytes: int  # this rank's share of the model's parameters in fp32 (tensor x pipeline split), planned


def _check_inputs(cfg: RunConfig, deepspeed_config_file: str | None) -> _Inputs:
    """Everything that can be wrong with the input and is known before the data and the model are built,
    checked identically on every rank."""
    world = dist.get_world_size()
    ds_config = (load_user_deepspeed_config(deepspeed_config_file, cfg, world) if deepspeed_config_file
                 else deepspeed_config(cfg, world))
    engine_lib.check_precision(cfg.precision)
    train_files = data.expand_files(cfg.data.train_files, "data.train_files")
    valid_files = data.expand_files(cfg.data.valid_files, "data.valid_files") if cfg.data.valid_files else []
    model_config = hf_config(pretrained=cfg.model.pretrained, arch=cfg.model.arch, config=cfg.model.config,
                             trust_remote_code=cfg.model.trust_remote_code)
    check_task_fits(cfg, model_config)
    check_sequence_fits(model_config, cfg.data.seq_len, cfg.data.max_target_len if cfg.data.source_field else None)
    check_tensor_parallel_fits(model_config, cfg.parallel.tensor)
    check_pipeline_fits(model_config, cfg.parallel.pipeline, cfg.parallel.virtual_stages, cfg.parallel.partition)
    resume = elastic.resume_setting(cfg.train.resume)
    if resume != cfg.train.resume:
        _console(f"elastic restart {elastic.restart_count()} of this job (torchrun): world size {world}, "
                 f"continuing from the newest complete checkpoint in {cfg.train.output_dir}")
    resume_from = checkpoint.agree_on_resume(resume, cfg.train.output_dir)
    start_over = run_dir.check(cfg.train.output_dir, resume, cfg.train.overwrite)
    leftover = checkpoint.existing_checkpoint(cfg.train.output_dir) if resume_from is None else None
    if leftover is not None and not cfg.train.overwrite:
        _console(f"train.resume=auto: no complete checkpoint in {checkpoint.checkpoint_root(cfg.train.output_dir)} "
                 f"(only incomplete saves such as {leftover.name}, or an older format); starting from step 0")
    _check_writable(Path(cfg.train.output_dir))
    if cfg.train.export_hf:
        checkpoint.check_export_dir(Path(cfg.train.output_dir) / "hf")
    parameters = parameter_count(model_config, cfg.model.trust_remote_code)
    shard = parameters * 4 // (cfg.parallel.tensor * cfg.parallel.pipeline)
    return _Inputs(ds_config, train_files, valid_files, resume_from, start_over, shard)


def _check_writable(output_dir: Path) -> None:
    existing = next(p for p in (output_dir, *output_dir.absolute().parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"train.output_dir={output_dir}: {existing} is not a writable directory; choose an "
                          f"output_dir this user can write")


def _console(message: str) -> None:
    """A line for the user, from rank 0 (beside the progress bar)."""
    if dist.get_rank() == 0:
        from tqdm import tqdm

        tqdm.write(message)


def run_model_config(cfg: RunConfig, tokenizer, vocab_size: int | None = None):
    """The run's HF config: the checkpoint's, or ``model.config`` with the tokenizer's special tokens and its
    size (or ``vocab_size``) for a from-scratch run."""
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(tokenizer, k) is not None}
    if cfg.data.source_field and tokenizer.pad_token_id is not None:
        special["decoder_start_token_id"] = tokenizer.pad_token_id  # T5 / Marian convention
    return model_config(pretrained=cfg.model.pretrained, arch=cfg.model.arch,
                        config={**special, **cfg.model.config} if cfg.model.arch else {},
                        vocab_size=(vocab_size or len(tokenizer)) if cfg.model.arch else None,
                        trust_remote_code=cfg.model.trust_remote_code)


def _build_model(cfg: RunConfig, tokenizer, blocks: dict, resume_from: Path | None, groups: ProcessGroups):
    """This rank's part of the model (its tensor-parallel shard; with pipelines, its chunks) with its starting
    weights, checked against the tokenized data. The whole model exists only on the meta device (no storage):
    a rank holds its share plus one full tensor at a time (``modeling.materialize``).
    Returns (the full meta model, this rank's model, its pipeline chunks and tied weight or None)."""
    hf = run_model_config(cfg, tokenizer)
    full = empty_model(auto_class(hf), hf, cfg.model.trust_remote_code)
    vocabulary = full.get_input_embeddings().num_embeddings
    for key, key_blocks in blocks.items():
        if key_blocks is not None:
            data.check_token_ids(key_blocks, vocabulary, key, cfg.model.pretrained or cfg.model.arch)
    if vocabulary < len(tokenizer):
        raise ConfigError(f"model.pretrained={cfg.model.pretrained}: the tokenizer has {len(tokenizer)} tokens "
                          f"but the model only {vocabulary} embeddings")
    if resume_from is not None:
        checkpoint.check_weights(full, resume_from)
    model, pipeline = rank_model(cfg, full, groups)
    source = (checkpoint.CheckpointWeights(resume_from) if resume_from is not None
              else weights_source(cfg.model.pretrained, cfg.train.seed))  # every layout cuts the same full weights
    materialize(full, model, pipeline[0] if pipeline else model, source, groups.tp_group)
    return full, model, pipeline


def rank_model(cfg: RunConfig, full, groups: ProcessGroups):
    """This rank's part of the model ``full`` (on the meta device, kept whole): (its tensor-parallel shard
    with the recomputation mode on, its pipeline chunks and tied weight or None), without weights."""
    model = tensor_parallelize(copy.deepcopy(full), groups.tp_group, cfg.parallel.sequence_parallel,
                               cfg.parallel.tp_async_grad_reduce, dropout_seed=cfg.train.seed)
    recompute.apply(model, cfg.parallel.activation_checkpointing)
    return model, (build_chunks(model, cfg, groups) if groups.pipeline > 1 else None)


def _build_engine(cfg: RunConfig, model, pipeline, ds_config: dict[str, Any], groups: ProcessGroups):
    """(DeepSpeed engine, PipelineRunner or None) over this rank's tensor-parallel shard / pipeline chunks."""
    if pipeline is None:
        return engine_lib.build(model, cfg.optim, cfg.train.steps, ds_config, groups), None
    chunks, tied_weight = pipeline
    model_engine = engine_lib.build(chunks, cfg.optim, cfg.train.steps, ds_config, groups)
    return model_engine, PipelineRunner(model_engine, cfg, groups, tied_weight, model.config.hidden_size)


def _save_run_files(cfg: RunConfig, ds_config: dict[str, Any], tokenizer, start_over: bool) -> None:
    """Rank 0, once every check passed: the run's marker (an earlier run's files moved aside when this start
    begins again over them), the effective config, the DeepSpeed JSON and the tokenizer."""
    out = Path(cfg.train.output_dir)
    moved = run_dir.claim(cfg.train.output_dir, start_over)
    if moved is not None:
        _console(f"starting from step 0: the earlier run's files in {out} were moved into {moved}")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (out / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
    if not (out / "tokenizer" / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(str(out / "tokenizer"))


def _announce_resume(cfg: RunConfig, path: Path, resumed) -> None:
    """What the run continues from, and every setting that changed since that checkpoint was written."""
    _console(f"resuming from {path}: step {resumed.step}, {resumed.consumed_samples} samples consumed")
    changed = checkpoint.changed_settings(path, cfg.to_dict())
    if changed:
        _console("changed since that checkpoint, in effect from step "
                 f"{resumed.step + 1} (the LR schedule follows optim.* and train.steps as they are now): "
                 + ", ".join(changed))


def run(cfg: RunConfig, deepspeed_config_file: str | None = None) -> RunResult:
    """Train according to ``cfg``; collective over all ranks of the launched job. Nothing is written to
    ``train.output_dir`` until every check of the input has passed."""
    init_distributed(cfg.parallel.timeout_s)
    cfg = for_world(cfg, dist.get_world_size(), first_start=elastic.restart_count() == 0)
    inputs = _check_inputs(cfg, deepspeed_config_file)
    host_memory.release_freed_tensors(comm_device().type, inputs.shard_bytes)  # before the model's tensors exist
    groups = ProcessGroups.from_degrees(cfg.parallel.tensor, cfg.parallel.pipeline, timeout_s=cfg.parallel.timeout_s)
    set_seed(cfg.train.seed)  # Python's, NumPy's and torch's generators, as HF Trainer seeds them
    tokenizer = build_tokenizer(cfg, inputs.train_files, inputs.resume_from, inputs.start_over)
    train_blocks, valid_blocks = build_data(cfg, tokenizer, inputs.train_files, inputs.valid_files,
                                            fresh_start=inputs.resume_from is None)
    plan = data.BatchPlan(cfg.train.micro_batch_size, cfg.train.grad_accum, groups.data)
    data.check_enough_for_one_step(train_blocks, plan, "data.train_files")
    full, model, pipeline = _build_model(cfg, tokenizer, {"data.train_files": train_blocks,
                                                          "data.valid_files": valid_blocks}, inputs.resume_from, groups)
    parameters, vocabulary = sum(p.numel() for p in full.parameters()), full.get_input_embeddings().num_embeddings
    _console(f"model: {describe(full.config, parameters, vocabulary)}; layout: {layout(cfg, dist.get_world_size())}")
    del full
    model_engine, runner = _build_engine(cfg, model, pipeline, inputs.ds_config, groups)
    resumed = None
    if inputs.resume_from is not None:
        resumed = checkpoint.restore(model_engine, model, groups, inputs.resume_from)
        _announce_resume(cfg, inputs.resume_from, resumed)
    on_rank0(lambda: _save_run_files(cfg, inputs.ds_config, tokenizer, inputs.start_over), "writing the run files")
    start_step = resumed.step if resumed else 0
    # Samples already seen: the data order continues where it stopped even if the global batch changed.
    sample_offset = resumed.consumed_samples - start_step * plan.global_batch if resumed else 0
    batches = data.TrainBatches(train_blocks, plan, groups.dp_rank, cfg.train.seed,
                                pad_id=tokenizer.pad_token_id if cfg.data.source_field else None,
                                sample_offset=sample_offset)
    sink = MetricsSink(cfg.train.output_dir, dist.get_rank() == 0, cfg.logging.wandb,
                       {**cfg.to_dict(), "layout": groups.describe()}, resume_after_step=start_step if resumed else None)
    result = RunResult(output_dir=Path(cfg.train.output_dir), engine=model_engine, groups=groups, model=model,
                       runner=runner)
    loop = _Loop(cfg, result, tokenizer, batches, valid_blocks, sink,
                 tokens_per_step=None if cfg.data.source_field else plan.global_batch * cfg.data.seq_len,
                 sample_offset=sample_offset, skipped_before=resumed.skipped_steps if resumed else 0,
                 samples=_sample_log(cfg, groups, start_step))
    try:
        loop.run(start_step)
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
    return SampleLog(cfg.train.output_dir, groups.dp_rank, groups.tp_rank == 0 and groups.pp_rank == 0)


def _data_parallel_step(cfg, model_engine, batches, groups, step: int, device) -> tuple[float, float]:
    """One optimizer step without a pipeline: ``grad_accum`` forward/backward passes; DeepSpeed reduces and
    steps at the accumulation boundary. Returns (mean loss over the global batch, global grad norm)."""
    micro_losses, grad_norm = [], None
    for micro_index in range(cfg.train.grad_accum):
        batch = {k: v.to(device) for k, v in batches.batch(step, micro_index).items()}
        if cfg.data.source_field:
            loss = seq2seq.step_loss(model_engine, batch, groups)
        else:
            logits = model_engine(input_ids=batch["input_ids"]).logits
            loss = lm_loss(model_engine.module, logits, batch["labels"], groups.tp_group)
        model_engine.backward(loss)
        if micro_index == cfg.train.grad_accum - 1 and model_engine.zero_optimization_stage() == 0:
            grad_norm = _grad_norm(model_engine, groups)  # before step() clips in place
        model_engine.step()
        micro_losses.append(loss.detach())  # stays on the device: no host wait per micro-batch
    if grad_norm is None:
        grad_norm = _grad_norm(model_engine, groups)
    (loss_sum,) = sum_over(groups.dp_group, torch.stack(micro_losses).double().mean())
    return loss_sum / groups.data, grad_norm


class _Loop:
    """The step loop of one run: steps, logging, eval and checkpoint cadence, skipped non-finite steps,
    and a stop signal turned into a saved checkpoint. ``operation`` names what it is doing (for errors)."""

    def __init__(self, cfg, result: RunResult, tokenizer, batches, valid_blocks, sink, *, tokens_per_step,
                 sample_offset, skipped_before, samples=None):
        """``result``: the run's engine, runner, model and groups, and the history this loop fills."""
        self.cfg, self.result, self.tokenizer, self.sink = cfg, result, tokenizer, sink
        self.batches, self.valid_blocks = batches, valid_blocks
        self.engine, self.runner, self.model, self.groups = result.engine, result.runner, result.model, result.groups
        self.tokens_per_step, self.sample_offset, self.samples = tokens_per_step, sample_offset, samples
        self.nonfinite = NonFiniteSteps(cfg.train.max_consecutive_skips, skipped_before)
        self.operation = "setup"
        self.last_saved: Path | None = None
        self.background = BackgroundSave() if cfg.train.async_save else None

    def run(self, start_step: int) -> None:
        """Train, export, and say where the results are; a collective timeout names what was running."""
        cfg, out = self.cfg, Path(self.cfg.train.output_dir)
        try:
            self.train(start_step)
            self.finish_saves()
            if cfg.train.export_hf:
                self.operation = "the final Hugging Face export"
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
        _console(f"done: {cfg.train.steps} steps; " + "; ".join(written))

    def save(self, step: int) -> Path:
        """Save the checkpoint of ``step`` and log how long the step loop waited for it (``checkpoint_s``:
        the whole save, or with ``train.async_save`` the copy to host memory and any wait for the previous)."""
        self.operation = f"the checkpoint save of step {step}"
        started = time.perf_counter()
        consumed = self.sample_offset + step * self.batches.plan.global_batch
        self.last_saved = checkpoint.save(self.engine, self.model, self.tokenizer, self.groups, self.cfg.to_dict(),
                                          step, consumed, self.cfg.train.output_dir, self.background,
                                          self.cfg.parallel.timeout_s)
        record = {"step": step, "checkpoint_s": time.perf_counter() - started}
        self.sink.log(record)
        self.result.history.append(record)
        return self.last_saved

    def finish_saves(self) -> None:
        """Wait for the checkpoint being written in the background (``train.async_save``), if any."""
        if self.background is not None and self.background.in_flight is not None:
            self.operation = f"the background write of the checkpoint of step {self.background.in_flight}"
            self.background.wait()

    def train(self, start_step: int) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        progress = tqdm(total=cfg.train.steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0,
                        disable=dist.get_rank() != 0 or not cfg.train.progress)
        if cfg.train.eval_first and start_step == 0 and self.valid_blocks is not None:
            self.evaluate(progress, 0)
        with StopSignals() as signals:
            for step in range(start_step, cfg.train.steps):
                self.operation = f"training step {step + 1} (forward, backward, gradient reduction, optimizer step)"
                record = self.step(step)
                if self.samples is not None:
                    ids = [i for micro in range(cfg.train.grad_accum) for i in self.batches.ids(step, micro)]
                    self.samples.record(step + 1, ids, elastic.restart_count())
                if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps or "skipped" in record:
                    self.sink.log(record)
                    self.result.history.append(record)
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}", step_s=f"{record['step_time_s']:.2f}")
                self.nonfinite.record(step + 1, "skipped" not in record, record["loss"], record["grad_norm"])
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
        progress.close()

    def step(self, step: int) -> dict[str, Any]:
        cfg, engine, groups = self.cfg, self.engine, self.groups
        started = time.perf_counter()
        lr = engine.get_lr()[0]
        if self.runner is not None:
            mean_loss = self.runner.train_step(self.batches, step)
            grad_norm = _grad_norm(engine, groups)
        else:
            mean_loss, grad_norm = _data_parallel_step(cfg, engine, self.batches, groups, step, engine.device)
        elapsed = time.perf_counter() - started
        record = {"step": step + 1, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": elapsed}
        if self.tokens_per_step is not None:
            record["tokens_per_s"] = self.tokens_per_step / elapsed
        if not engine.was_step_applied():
            record["skipped"] = True
        record["skipped_steps"] = self.nonfinite.total + ("skipped" in record)
        return record

    def evaluate(self, progress, step: int) -> None:
        self.operation = f"the evaluation at step {step}"
        _evaluate_and_log(self.cfg, self.engine, self.runner, self.valid_blocks, self.groups, self.tokenizer,
                          self.sink, self.result, progress, step)


def _evaluate_and_log(cfg, model_engine, runner, valid_blocks, groups, tokenizer, sink, result, progress, step):
    signature = None
    if cfg.data.source_field:
        scores, signature = seq2seq.evaluate(model_engine, valid_blocks, cfg, groups, tokenizer)
    else:
        scores = evaluate(model_engine, runner, valid_blocks, cfg, groups)
    metrics = {"step": step, **scores, **({"bleu_signature": signature} if signature else {})}
    sink.log(metrics)
    result.history.append(metrics)
    if dist.get_rank() == 0:
        bleu = f" BLEU {metrics['bleu']:.2f} ({signature})" if "bleu" in metrics else ""
        progress.write(f"step {step}: eval_loss {metrics['eval_loss']:.4f} "
                       f"perplexity {metrics['perplexity']:.2f}{bleu}")
