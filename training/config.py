"""Typed run configuration: YAML file + dotted ``--set`` overrides -> a frozen, validated ``RunConfig``.

Sections mirror the YAML. Every error names the dotted key, the bad value and the fix; an unknown key
also names the nearest valid one (``optim.lrr`` -> "did you mean optim.lr?"). Precedence is
CLI overrides > file > defaults. The sections are in ``training.config_schema``; the DeepSpeed JSON generated
from this config, or a user's checked against it, in ``training.deepspeed_config``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from parallel.groups import check_degrees
from parallel.schedules import check_schedule
from training.config_schema import (
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    Section,
    TrainConfig,
)


class ConfigError(ValueError):
    """A user-facing configuration error; the message says which key is wrong and how to fix it."""


class RunConfig(Section):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    precision: Literal["fp32", "bf16", "fp16"] = Field(default="fp32", description="Training precision.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.optim.warmup_steps > self.train.steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} exceeds train.steps="
                             f"{self.train.steps}: lower the warm-up or train longer")
        self._check_zero_rules()
        self._check_compression_rules()
        self._check_sync_rules()
        self._check_pipeline_rules()
        self._check_model_kind_rules()
        self._check_context_rules()
        self._check_document_rules()
        self._check_tiling_rules()
        return self

    def _check_zero_rules(self) -> None:
        par = self.parallel
        if par.pipeline > 1 and par.zero_stage == 0:
            raise ValueError(f"parallel.zero_stage=0 with parallel.pipeline={par.pipeline}: ZeRO-0 is not wired to "
                             f"the pipeline's deferred gradient reduction; set parallel.zero_stage=1, 2 or 3")
        if self.precision != "fp32" and par.zero_stage == 0:
            raise ValueError(f"precision={self.precision} with parallel.zero_stage=0: DeepSpeed then wraps AdamW in "
                             f"its fp16/bf16 optimizer, whose fp32 master weights and moments our layout-agnostic "
                             f"checkpoints do not read; use parallel.zero_stage=1 (the same memory at one "
                             f"data-parallel rank, sharded masters and moments at more)")
        if par.offload != "none" and par.zero_stage == 0:
            raise ValueError(f"parallel.offload={par.offload} needs ZeRO: DeepSpeed offloads the optimizer state of "
                             f"its ZeRO partitions (stages 1-3); set parallel.zero_stage=1, 2 or 3")
        if par.offload == "optimizer+params" and par.zero_stage != 3:
            raise ValueError(f"parallel.offload=optimizer+params with parallel.zero_stage={par.zero_stage}: "
                             f"DeepSpeed offloads parameters only under ZeRO-3, which partitions them; set "
                             f"parallel.zero_stage=3 or parallel.offload=optimizer")
        if par.expert > 1 and par.zero_stage not in (1, 2):
            raise ValueError(f"parallel.expert={par.expert} with parallel.zero_stage={par.zero_stage}: expert "
                             f"parameters are reduced and partitioned over their own data-parallel group by "
                             f"DeepSpeed's ZeRO 1/2 (ZeRO-0 would clip by a norm averaged over ranks holding "
                             f"different experts, ZeRO-3 does not take colonnade's experts); set "
                             f"parallel.zero_stage=1 or 2")
        if par.zero_stage == 3 and par.tensor > 1 and par.pipeline > 1:
            raise ValueError("parallel.zero_stage=3 with both parallel.tensor>1 and parallel.pipeline>1 is not "
                             "supported: DeepSpeed's ZeRO-3 gradient norm ignores ds_pipe_replicated, so the last "
                             "stage's vocabulary-parallel copy of a tied embedding would be counted twice; use "
                             "zero_stage 1 or 2 for 3D layouts, or ZeRO-3 with only one of tensor / pipeline")

    def _check_compression_rules(self) -> None:
        par = self.parallel
        if par.grad_compression == "none":
            return
        setting = f"parallel.grad_compression={par.grad_compression}"
        if par.zero_stage == 3:
            raise ValueError(f"{setting} with parallel.zero_stage=3: ZeRO-3 reduce-scatters gradients in its own "
                             f"hooks, which colonnade does not compress; use parallel.zero_stage 0, 1 or 2")
        if par.offload != "none":
            raise ValueError(f"{setting} with parallel.offload={par.offload}: DeepSpeed's offload path reduces "
                             f"gradients on its own; set parallel.offload=none or parallel.grad_compression=none")
        if par.expert > 1:
            raise ValueError(f"{setting} with parallel.expert={par.expert}: expert gradients are reduced over their "
                             f"own group by DeepSpeed; set parallel.expert=1 or parallel.grad_compression=none")
        if par.overlap_comm:
            raise ValueError(f"{setting} with parallel.overlap_comm=true: the compressed reduction runs on the "
                             f"compute stream; leave parallel.overlap_comm unset")

    def _check_sync_rules(self) -> None:
        every, train = self.parallel.sync_every, self.train
        if every == 1:
            return
        if self.parallel.zero_stage != 0:
            raise ValueError(f"parallel.sync_every={every} with parallel.zero_stage={self.parallel.zero_stage}: each "
                             f"data-parallel rank is a replica stepping on its own, which ZeRO's shared partitions "
                             f"cannot do; set parallel.zero_stage=0")
        for key, value in (("train.save_every", train.save_every), ("train.eval_every", train.eval_every)):
            if value % every:
                raise ValueError(f"{key}={value} with parallel.sync_every={every}: checkpoints and evals see the "
                                 f"synchronised model; set {key} to a multiple of {every}")

    def _check_pipeline_rules(self) -> None:
        par = self.parallel
        if par.pipeline > 1 and par.zero_stage == 1 and par.overlap_comm:
            raise ValueError("parallel.overlap_comm=true with parallel.pipeline>1 at parallel.zero_stage=1: DeepSpeed "
                             "overlaps the gradient reduction only at ZeRO-2 when colonnade's pipeline schedule "
                             "drives the accumulation; use zero_stage=2 or leave overlap_comm unset")
        if par.pipeline == 1 and (par.virtual_stages != 1 or par.schedule in ("interleaved", "zb-h1")):
            raise ValueError(f"parallel.virtual_stages / parallel.schedule={par.schedule} need parallel.pipeline > 1")
        if par.schedule == "zb-h1" and par.zero_stage == 3:
            raise ValueError("parallel.schedule=zb-h1 with parallel.zero_stage=3 is not supported: the W passes hand "
                             "weight gradients to parameters that ZeRO-3 has released; use zero_stage 1 or 2 "
                             "(or schedule 1f1b with ZeRO-3)")
        if par.pipeline > 1 and not self.train.derives_grad_accum:  # else checked once it is derived
            try:
                check_schedule(par.schedule, par.pipeline, self.train.grad_accum, par.virtual_stages)
            except ValueError as exc:
                raise ValueError(str(exc)) from None

    def _check_model_kind_rules(self) -> None:
        """Encoder-decoder runs and sequence parallelism."""
        par = self.parallel
        if (self.data.source_field is None) != (self.data.target_field is None):
            raise ValueError("set both data.source_field and data.target_field (encoder-decoder runs) or neither")
        if self.data.source_field is not None and par.pipeline > 1:
            raise ValueError(f"parallel.pipeline={par.pipeline} with an encoder-decoder run (data.source_field "
                             f"set): pipeline parallelism is implemented for decoder-only models. Every decoder "
                             f"layer attends to the encoder's output, so a stage split would have to carry it "
                             f"(and its gradient) through every later stage; use parallel.tensor and data "
                             f"parallelism (ZeRO) for encoder-decoder models")
        if self.data.source_field is not None and par.sequence_parallel:
            raise ValueError("parallel.sequence_parallel is implemented for decoder-only models; turn it off "
                             "for encoder-decoder runs (data.source_field is set)")
        if self.parallel.sequence_parallel and self.parallel.tensor == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tensor > 1")
        if self.parallel.sequence_parallel and self.data.seq_len % self.parallel.tensor:
            raise ValueError(f"parallel.sequence_parallel: data.seq_len={self.data.seq_len} must be divisible "
                             f"by parallel.tensor={self.parallel.tensor}")

    def _check_tiling_rules(self) -> None:
        if self.parallel.mlp_tiles > 1 and self.parallel.sequence_parallel:
            raise ValueError("parallel.mlp_tiles with parallel.sequence_parallel: DeepSpeed's TiledMLP recomputes "
                             "its tiles flattened to [tokens, hidden], which the sequence-parallel layers cannot "
                             "gather; use one of them")

    def _check_document_rules(self) -> None:
        if not self.data.separate_documents:
            return
        if self.data.source_field is not None:
            raise ValueError("data.separate_documents is for decoder-only runs (packed blocks); turn it off for "
                             "encoder-decoder runs (data.source_field is set)")
        if self.parallel.pipeline > 1:
            raise ValueError(f"data.separate_documents with parallel.pipeline={self.parallel.pipeline}: the stages "
                             f"after the first do not receive each micro-batch's position ids; set "
                             f"parallel.pipeline=1 or data.separate_documents=false")

    def _check_context_rules(self) -> None:
        par, seq_len = self.parallel, self.data.seq_len
        if par.context == 1:
            return
        setting = f"parallel.context={par.context}"
        if self.data.source_field is not None:
            raise ValueError(f"{setting} with an encoder-decoder run (data.source_field set): context parallelism "
                             f"is implemented for decoder-only models; set parallel.context=1")
        for key, value, fix in (("parallel.expert", par.expert, 1), ("parallel.sync_every", par.sync_every, 1)):
            if value != fix:
                raise ValueError(f"{setting} with {key}={value} is not supported; set {key}={fix} or "
                                 f"parallel.context=1")
        if par.pipeline > 1 and par.partition == "measured":
            raise ValueError(f"{setting} with parallel.partition=measured: the stage-cost probes run each block "
                             f"alone, without the context group; use 'uniform', 'parameters' or a partition string")
        split = 2 * par.context * (par.tensor if par.sequence_parallel else 1)
        if seq_len % split:
            raise ValueError(f"{setting}: data.seq_len={seq_len} must be divisible by {split} (2 chunks per context "
                             f"rank{' x parallel.tensor with sequence_parallel' if par.sequence_parallel else ''})")

    def to_dict(self) -> dict[str, Any]:
        """The config as YAML would hold it; with train.global_batch_size, train.grad_accum (derived for each
        world size by ``for_world``) is left out, so a saved config.yaml runs at any data-parallel size."""
        raw = self.model_dump(mode="json")
        if self.train.global_batch_size is not None:
            del raw["train"]["grad_accum"]
        return raw


# --------------------------------------------------------------------------------------------- loading

def _fields_at(path: tuple) -> list[str] | None:
    """Valid keys of the section reached by ``path`` (None if the path leaves the schema)."""
    cls: Any = RunConfig
    for part in path:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        cls = field.annotation
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
    return list(cls.model_fields)


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _describe(error: ErrorDetails) -> str:
    loc = tuple(p for p in error["loc"])
    key = _dotted(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = _fields_at(loc[:-1]) or []
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        prefix = _dotted(loc[:-1])
        hint = (f"did you mean {prefix + '.' if prefix else ''}{near[0]}?" if near
                else f"valid keys here: {', '.join(valid)}")
        return f"{key}: unknown key; {hint}"
    if kind == "missing":
        return f"{key}: required key is missing; add it to the YAML or pass --set {key}=..."
    if not loc:  # a model_validator on the whole run
        return error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    return f"{key}={value!r}: {error['msg'].removeprefix('Value error, ')}"


def validate(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a nested dict into a ``RunConfig``; raise ``ConfigError`` listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, data, train, ...), "
                          f"got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        raise ConfigError(f"invalid configuration ({source}):\n{problems}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'optim.lr=3e-4'`` -> (['optim', 'lr'], 0.0003). The value is read as YAML (numbers, lists, null); text
    that is not valid YAML is taken as a string."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set optim.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:  # '{stdlib}/a*.py', '[0.9,': the text as written (the schema says if it is wrong)
        value = text.strip()
    if isinstance(value, str):  # YAML 1.1 reads '3e-4' as a string; users mean a number
        try:
            value = float(value) if any(c in value for c in "eE.") and value.lower() != "e" else value
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    for item in overrides:
        path, value = parse_override(item)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is a value, not a section")
            node = child
        if value is None:  # --set key=null: unset, the schema's default applies
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return merged


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read ``path`` (YAML), apply ``overrides`` and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file "
                              f"(see configs/quickstart.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return validate(apply_overrides(raw, list(overrides)), source=str(path or "--set"))


# ------------------------------------------------------------------------------------- world size

def data_parallel_size(cfg: RunConfig, world_size: int) -> int:
    """The data-parallel degree of ``world_size`` processes (``parallel.groups.check_degrees``' rule)."""
    try:
        return check_degrees(cfg.parallel.tensor, cfg.parallel.pipeline, world_size, cfg.parallel.expert,
                             cfg.parallel.context)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def for_world(cfg: RunConfig, world_size: int, first_start: bool = True) -> RunConfig:
    """``cfg`` for a launch of ``world_size`` processes: with ``train.global_batch_size`` its grad_accum derived
    (and checked, e.g. against the pipeline schedule); otherwise ``cfg`` itself. A ``train.grad_accum`` the YAML
    also sets must agree at the first start; an elastic restart (``first_start`` False) at another data-parallel
    size derives it as every start does."""
    if cfg.train.global_batch_size is None:
        return cfg
    context = cfg.parallel.context
    dp, micro, total = data_parallel_size(cfg, world_size) // context, cfg.train.micro_batch_size, \
        cfg.train.global_batch_size
    where = (f"train.micro_batch_size={micro} x data-parallel size {dp} (world size {world_size} / tensor "
             f"{cfg.parallel.tensor} x pipeline {cfg.parallel.pipeline}{f' x context {context}' * (context > 1)})")
    if total % (micro * dp):
        raise ConfigError(f"train.global_batch_size={total} is not divisible by {where}; choose a global batch "
                          f"that every data-parallel size the job may run at divides, or another micro_batch_size")
    accum = total // (micro * dp)
    if first_start and "grad_accum" in cfg.train.model_fields_set and cfg.train.grad_accum != accum:
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} and train.global_batch_size={total} disagree: "
                          f"{where} gives grad_accum {accum}; with a global batch size grad_accum is derived at "
                          f"every world size: remove it from the YAML or pass --set train.grad_accum=null")
    par = cfg.parallel
    if par.pipeline > 1:
        try:
            check_schedule(par.schedule, par.pipeline, accum, par.virtual_stages)
        except ValueError as exc:
            raise ConfigError(f"train.global_batch_size={total} at world size {world_size}: {exc}") from None
    raw = cfg.to_dict()
    raw["train"]["grad_accum"] = accum
    return validate(raw, source=f"train.global_batch_size={total} at world size {world_size}")
