"""Run assembly: from checked inputs to the parts a step loop needs (tokenizer, data, this rank's model, the
DeepSpeed engine, the step implementation, the resumed state), with the run's files written once it all
exists. Collective: every rank calls ``assemble`` alike."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml
from transformers import set_seed

from modeling import context as context_parallel
from modeling import lean, recompute
from modeling.build import (
    auto_class,
    byte_level_tokenizer,
    describe,
    load_tokenizer,
    model_config,
    train_bpe_tokenizer,
    weights_source,
)
from modeling.experts import expert_parallelize
from modeling.materialize import empty_model, materialize
from modeling.pipeline_partition import build_chunks
from modeling.tensor_parallel import tensor_parallelize
from parallel.groups import ProcessGroups
from training import checkpoint, compressed_reduce, data, outer_sync, run_dir
from training import engine as engine_lib
from training.compile import compile_blocks
from training.config import ConfigError, RunConfig
from training.describe import layout
from training.events import Observers
from training.inputs import Inputs, console
from training.pipeline import PipelineRunner, pipeline_settings, write_measured_partition
from training.rank0 import on_rank0, rank0_first
from training.steps import DataParallelStep, Step
from training.tasks import Task, task_for
from training.tiling import tile_mlps

EditConfig = Callable[[Any], Any]


@dataclass
class Assembly:
    """A run ready to train: its parts, and where the step loop starts."""

    tokenizer: Any
    model: Any                  # this rank's HF model object (its tensor-parallel shard / the chunks' model)
    engine: Any                 # the DeepSpeed engine
    step: Step
    plan: data.BatchPlan
    train_blocks: Any
    valid_blocks: Any
    start_step: int
    resumed: Any                # checkpoint.TrainerState or None


def assemble(cfg: RunConfig, task: Task, inputs: Inputs, groups: ProcessGroups, events: Observers,
             edit_model_config: EditConfig | None = None) -> Assembly:
    set_seed(cfg.train.seed)  # Python's, NumPy's and torch's generators, as HF Trainer seeds them
    tokenizer = build_tokenizer(cfg, task, inputs.train_files, inputs.resume_from, inputs.start_over)
    train_blocks, valid_blocks = build_data(cfg, task, tokenizer, inputs.train_files, inputs.valid_files,
                                            fresh_start=inputs.resume_from is None)
    plan = data.BatchPlan(cfg.train.micro_batch_size, cfg.train.grad_accum, groups.replicas)
    data.check_enough_for_one_step(train_blocks, plan, "data.train_files")
    with events.phase("load", 0):
        full, model, pipeline = build_model(cfg, tokenizer, {"data.train_files": train_blocks,
                                                             "data.valid_files": valid_blocks},
                                            inputs.resume_from, groups, edit_model_config)
        parameters, vocabulary = sum(p.numel() for p in full.parameters()), full.get_input_embeddings().num_embeddings
        console(f"model: {describe(full.config, parameters, vocabulary)}; "
                f"layout: {layout(cfg, dist.get_world_size())}")
        del full
        engine, step = build_engine(cfg, model, pipeline, inputs.ds_config, groups, task, events)
    resumed = None
    if inputs.resume_from is not None:
        with events.phase("resume", 0):
            resumed = checkpoint.restore(engine, model, groups, inputs.resume_from)
        announce_resume(cfg, inputs.resume_from, resumed)
    on_rank0(lambda: save_run_files(cfg, inputs.ds_config, tokenizer, inputs.start_over), "writing the run files")
    return Assembly(tokenizer, model, engine, step, plan, train_blocks, valid_blocks,
                    resumed.step if resumed else 0, resumed)


def build_tokenizer(cfg: RunConfig, task: Task, train_files: list[str], resume_from: Path | None = None,
                    start_over: bool = False) -> Any:
    """The run's tokenizer: the one saved in ``output_dir/tokenizer`` by an earlier start of this run (unless this
    start begins again over it), else a resumed checkpoint's, else what ``model.tokenizer`` says. A directory is
    read by every rank (rank 0 first); a BPE is trained on rank 0 and sent to the others. Nothing is written
    here (``save_run_files`` does, once every input check has passed)."""
    choice = cfg.model.tokenizer or (cfg.model.pretrained if cfg.model.pretrained else "byte")
    saved = [d for d in (None if start_over else Path(cfg.train.output_dir) / "tokenizer", resume_from)
             if d is not None and (d / "tokenizer_config.json").is_file()]
    directory = saved[0] if saved else (None if choice in ("byte", "bpe") else Path(choice))
    if directory is not None:
        def load() -> Any:
            if not directory.is_dir():
                raise FileNotFoundError(f"model.tokenizer={choice}: not 'byte', 'bpe' or a tokenizer directory")
            return load_tokenizer(directory, cfg.model.trust_remote_code)

        return rank0_first(load, "loading the tokenizer")
    if choice == "byte":
        return byte_level_tokenizer()
    trained = on_rank0(lambda: train_bpe_tokenizer(task.texts(train_files), cfg.model.bpe_vocab_size),
                       "training the BPE tokenizer")
    shared = [trained]
    dist.broadcast_object_list(shared, src=0)  # a tokenizers-backed object: pickles whole, no files behind it
    return shared[0]


def build_data(cfg: RunConfig, task: Task, tokenizer: Any, train_files: list[str], valid_files: list[str],
               fresh_start: bool = True) -> tuple[Any, Any]:
    """The task's training and validation examples (made on rank 0 first, then read from the cache); the
    tokenize and pack bars only on rank 0 of a fresh start with ``train.progress``."""
    def make() -> dict[str, Any]:
        return {key: task.blocks(tokenizer, files, key)
                for key, files in (("data.train_files", train_files), ("data.valid_files", valid_files)) if files}

    with data.datasets_progress(cfg.train.progress and fresh_start and dist.get_rank() == 0):
        blocks = rank0_first(make, "tokenizing the data")
    return blocks["data.train_files"], blocks.get("data.valid_files")


def run_model_config(cfg: RunConfig, tokenizer: Any, vocab_size: int | None = None) -> Any:
    """The run's HF config: the checkpoint's, or ``model.config`` with the tokenizer's special tokens (as the
    task takes them) and its size (or ``vocab_size``) for a from-scratch run."""
    special = task_for(cfg).model_tokens(tokenizer)
    return model_config(pretrained=cfg.model.pretrained, arch=cfg.model.arch,
                        config={**special, **cfg.model.config} if cfg.model.arch else {},
                        vocab_size=(vocab_size or len(tokenizer)) if cfg.model.arch else None,
                        trust_remote_code=cfg.model.trust_remote_code)


def build_model(cfg: RunConfig, tokenizer: Any, blocks: dict[str, Any], resume_from: Path | None,
                groups: ProcessGroups, edit_model_config: EditConfig | None = None) -> tuple[Any, Any, Any]:
    """This rank's part of the model (its tensor-parallel shard; with pipelines, its chunks) with its starting
    weights, checked against the tokenized data. The whole model exists only on the meta device (no storage):
    a rank holds its share plus one full tensor at a time (``modeling.materialize``). ``edit_model_config``
    (bench's divergence finder: dropout off) changes the HF config before the model is built.
    Returns (the full meta model, this rank's model, its pipeline chunks and tied weight or None)."""
    hf = run_model_config(cfg, tokenizer)
    if edit_model_config is not None:
        hf = edit_model_config(hf)
    full = empty_model(auto_class(hf), hf, cfg.model.trust_remote_code)
    vocabulary = full.get_input_embeddings().num_embeddings
    for key, key_blocks in blocks.items():
        if key_blocks is not None:
            data.check_token_ids(key_blocks, vocabulary, key, str(cfg.model.pretrained or cfg.model.arch))
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


def rank_model(cfg: RunConfig, full: Any, groups: ProcessGroups) -> tuple[Any, Any]:
    """This rank's part of the model ``full`` (on the meta device, kept whole): (its tensor-parallel shard
    with the recomputation mode on, its pipeline chunks and tied weight or None), without weights."""
    model = copy.deepcopy(full)
    expert_parallelize(model, groups)  # first: the tensor-parallel plan hooks the parameters it keeps
    model = tensor_parallelize(model, groups.tp_group, cfg.parallel.sequence_parallel,
                               cfg.parallel.tp_async_grad_reduce, dropout_seed=cfg.train.seed)
    recompute.apply(model, cfg.parallel.activation_checkpointing)
    # compiled blocks: inductor's partitioner chooses what to keep and recompute (lean's hooks would break graphs)
    lean.apply(model, cfg.parallel.lean_activations and not cfg.train.compile, cfg.parallel.activation_checkpointing)
    tile_mlps(model, cfg.parallel.mlp_tiles)
    if groups.context > 1:  # after: Ulysses runs the (selectively recomputed) attention function on all tokens
        context_parallel.apply(model, groups.cp_group, cfg.parallel.context_attention, groups.tensor,
                               cfg.data.separate_documents)
    compile_blocks(model, cfg)  # last on the blocks, before the pipeline chunks that call them
    if groups.pipeline == 1:
        return model, None
    built = build_chunks(model, groups, pipeline_settings(cfg))
    write_measured_partition(cfg.train.output_dir, built)
    return model, (built.chunks, built.tied_weight)


def build_engine(cfg: RunConfig, model: Any, pipeline: Any, ds_config: dict[str, Any], groups: ProcessGroups,
                 task: Task, events: Observers) -> tuple[Any, Step]:
    """(the DeepSpeed engine over this rank's shard / pipeline chunks, the run's step): chosen here, once."""
    if pipeline is None:
        engine = engine_lib.build(model, cfg.optim, cfg.train.steps, ds_config, groups)
        compressed_reduce.attach(cfg.parallel, engine, groups, engine_lib.hidden_size_of(model))
        outer_sync.attach(cfg.parallel, engine, groups)
        return engine, DataParallelStep(cfg, engine, groups, task, events)
    chunks, tied_weight = pipeline
    engine = engine_lib.build(chunks, cfg.optim, cfg.train.steps, ds_config, groups)
    compressed_reduce.attach(cfg.parallel, engine, groups, model.config.hidden_size)
    return engine, PipelineRunner(engine, cfg, groups, tied_weight, model.config.hidden_size, events)


def save_run_files(cfg: RunConfig, ds_config: dict[str, Any], tokenizer: Any, start_over: bool) -> None:
    """Rank 0, once every check passed: the run's marker (an earlier run's files moved aside when this start
    begins again over them), the effective config, the DeepSpeed JSON and the tokenizer."""
    out = Path(cfg.train.output_dir)
    moved = run_dir.claim(cfg.train.output_dir, start_over)
    if moved is not None:
        console(f"starting from step 0: the earlier run's files in {out} were moved into {moved}")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (out / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
    if not (out / "tokenizer" / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(str(out / "tokenizer"))


def announce_resume(cfg: RunConfig, path: Path, resumed: Any) -> None:
    """What the run continues from, and every setting that changed since that checkpoint was written."""
    console(f"resuming from {path}: step {resumed.step}, {resumed.consumed_samples} samples consumed")
    if resumed.residuals_restarted:
        console(f"parallel.grad_compression / sync_every: the error-feedback residuals and the outer loop start "
                f"afresh: {resumed.residuals_restarted}")
    changed = checkpoint.changed_settings(path, cfg.to_dict())
    if changed:
        console("changed since that checkpoint, in effect from step "
                f"{resumed.step + 1} (the LR schedule follows optim.* and train.steps as they are now): "
                + ", ".join(changed))
