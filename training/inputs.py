"""Everything that can be wrong with a run's input and is known before the data and the model are built,
checked identically on every rank, before anything is written."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from modeling.build import hf_config, meta_model
from modeling.context import check_context_fits
from modeling.experts import check_expert_parallel_fits, check_router_loss_fits
from modeling.pipeline import check_pipeline_fits, check_stage_modules
from modeling.tensor_parallel import check_sequence_parallel_fits
from modeling.tp_plans import check_tensor_parallel_fits
from training import checkpoint, data, elastic, run_dir
from training import engine as engine_lib
from training.config import ConfigError, RunConfig
from training.deepspeed_config import deepspeed_config, load_user_deepspeed_config
from training.tasks import Task
from training.tiling import block_mlps


@dataclass(frozen=True)
class Inputs:
    """What the checks of a run's input found, before anything is built or written."""

    ds_config: dict[str, Any]
    train_files: list[str]
    valid_files: list[str]
    resume_from: Path | None
    start_over: bool  # from step 0 over an earlier run's files, which ``run_dir.claim`` moves aside
    shard_bytes: int  # this rank's share of the model's parameters in fp32 (tensor x pipeline split), planned


def check_inputs(cfg: RunConfig, task: Task, deepspeed_config_file: str | None) -> Inputs:
    """Check the config, the files, the model against the task and the layout, and where the run resumes."""
    world = dist.get_world_size()
    ds_config = (load_user_deepspeed_config(deepspeed_config_file, cfg, world) if deepspeed_config_file
                 else deepspeed_config(cfg, world))
    engine_lib.check_precision(cfg.precision)
    train_files = data.expand_files(cfg.data.train_files, "data.train_files")
    valid_files = data.expand_files(cfg.data.valid_files, "data.valid_files") if cfg.data.valid_files else []
    model_config = hf_config(pretrained=cfg.model.pretrained, arch=cfg.model.arch, config=cfg.model.config,
                             trust_remote_code=cfg.model.trust_remote_code)
    task.check_fits(model_config)
    check_tensor_parallel_fits(model_config, cfg.parallel.tensor)
    check_pipeline_fits(model_config, cfg.parallel.pipeline, cfg.parallel.virtual_stages, cfg.parallel.partition)
    resume_from, start_over = _resume_point(cfg, world)
    _check_writable(Path(cfg.train.output_dir))
    if cfg.train.export_hf:
        checkpoint.check_export_dir(Path(cfg.train.output_dir) / "hf")
    model = meta_model(model_config, cfg.model.trust_remote_code)
    if cfg.parallel.pipeline > 1:
        check_stage_modules(model, f"parallel.pipeline={cfg.parallel.pipeline}")
    if cfg.parallel.sequence_parallel:
        check_stage_modules(model, "parallel.sequence_parallel=true", needs_plan=False)
        check_sequence_parallel_fits(model)
    check_expert_parallel_fits(model, cfg.parallel.expert)
    check_context_fits(model, cfg.parallel.context, cfg.parallel.context_attention, cfg.parallel.tensor)
    if cfg.parallel.mlp_tiles > 1:
        block_mlps(model)
    check_router_loss_fits(model, cfg.parallel.pipeline, cfg.parallel.sequence_parallel, cfg.precision)
    shard = sum(p.numel() for p in model.parameters()) * 4 // (cfg.parallel.tensor * cfg.parallel.pipeline)
    return Inputs(ds_config, train_files, valid_files, resume_from, start_over, shard)


def _resume_point(cfg: RunConfig, world: int) -> tuple[Path | None, bool]:
    """(the checkpoint this start resumes from, whether it starts over an earlier run's files)."""
    resume = elastic.resume_setting(cfg.train.resume)
    if resume != cfg.train.resume:
        console(f"elastic restart {elastic.restart_count()} of this job (torchrun): world size {world}, "
                f"continuing from the newest complete checkpoint in {cfg.train.output_dir}")
    resume_from = checkpoint.agree_on_resume(resume, cfg.train.output_dir)
    start_over = run_dir.check(cfg.train.output_dir, resume, cfg.train.overwrite)
    leftover = checkpoint.existing_checkpoint(cfg.train.output_dir) if resume_from is None else None
    if leftover is not None and not cfg.train.overwrite:
        console(f"train.resume=auto: no complete checkpoint in {checkpoint.checkpoint_root(cfg.train.output_dir)} "
                f"(only incomplete saves such as {leftover.name}, or an older format); starting from step 0")
    return resume_from, start_over


def _check_writable(output_dir: Path) -> None:
    existing = next(p for p in (output_dir, *output_dir.absolute().parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"train.output_dir={output_dir}: {existing} is not a writable directory; choose an "
                          f"output_dir this user can write")


def console(message: str) -> None:
    """A line for the user, from rank 0 (beside the progress bar)."""
    if dist.get_rank() == 0:
        from tqdm import tqdm

        tqdm.write(message)
