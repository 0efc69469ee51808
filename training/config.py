"""Typed run configuration: YAML file + dotted ``--set`` overrides -> a frozen, validated ``RunConfig``.

Sections mirror the YAML. Every error names the dotted key, the bad value and the fix; an unknown key
also names the nearest valid one (``optim.lrr`` -> "did you mean optim.lr?"). Precedence is
CLI overrides > file > defaults. The DeepSpeed JSON is generated from this config
(:func:`deepspeed_config`) or, when a user brings their own, checked against it
(:func:`check_user_deepspeed_config`).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from parallel.groups import check_degrees
from parallel.schedules import check_schedule

PARTITION_METHODS = ("uniform", "parameters", "measured")


class ConfigError(ValueError):
    """A user-facing configuration error; the message says which key is wrong and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    pretrained: str | None = Field(None, description="Local Hugging Face checkpoint directory to fine-tune.")
    arch: str | None = Field(None, description="HF model_type for a from-scratch run, e.g. gpt2 or llama.")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="HF config fields for a from-scratch run (n_layer, ...).")
    tokenizer: str | None = Field(None, description="'byte', 'bpe' (trained on data.train_files) or a "
                                  "tokenizer directory; default: the checkpoint's own, else 'byte'.")
    bpe_vocab_size: int = Field(8192, ge=260, description="Vocabulary size when tokenizer is 'bpe'.")
    trust_remote_code: bool = Field(False, description="Allow code shipped inside the checkpoint to run.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.pretrained is None) == (self.arch is None):
            raise ValueError("set exactly one of model.pretrained (a local HF checkpoint dir) or "
                             "model.arch (+ model.config) for a from-scratch run")
        if self.pretrained is not None and self.config:
            raise ValueError("model.config applies to from-scratch runs only; the checkpoint's "
                             "config.json describes a pretrained model")
        return self


class DataConfig(_Section):
    train_files: list[str] = Field(min_length=1, description="Text/jsonl/parquet files or globs; "
                                   "'{stdlib}' expands to the Python standard library directory.")
    valid_files: list[str] = Field(default_factory=list, description="Held-out files for eval.")
    seq_len: int = Field(gt=1, description="Tokens per packed training block (decoder-only models); the "
                         "longest source, in tokens, for encoder-decoder models (longer ones are truncated).")
    text_field: str = Field("text", description="Column holding the text in jsonl/parquet files.")
    source_field: str | None = Field(None, description="Encoder-decoder models: column of the source text "
                                     "(jsonl/csv/parquet); setting it makes the run sequence-to-sequence.")
    target_field: str | None = Field(None, description="Encoder-decoder models: column of the target text.")
    max_target_len: int = Field(128, gt=1, description="Longest target, in tokens (longer are truncated).")
    cache_dir: str | None = Field(None, description="datasets cache; default ~/.cache/huggingface.")

    @field_validator("train_files", "valid_files", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value


class TrainConfig(_Section):
    steps: int = Field(gt=0, description="Optimizer steps to run.")
    micro_batch_size: int = Field(1, gt=0, description="Sequences per micro-batch per data-parallel rank.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: int | None = Field(None, gt=0, description="Sequences per optimizer step over all "
                                          "data-parallel ranks. When set, grad_accum is derived at launch as "
                                          "global_batch_size / (micro_batch_size x data-parallel size), so the "
                                          "batch stays the same when an elastic restart changes the number of "
                                          "nodes; None = micro_batch_size x grad_accum x data-parallel size.")
    seed: int = Field(1234, description="Seeds weights (from scratch), dropout and the data order.")
    output_dir: str = Field("runs/default", description="Metrics, checkpoints and the HF export. A new or empty "
                            "directory, or one an earlier start of a colonnade run wrote (it holds colonnade_run.json); "
                            "any other directory is refused.")
    overwrite: bool = Field(False, description="Start again from step 0 in output_dir although it holds a run: "
                            "that run's checkpoints, metrics and run files are moved into output_dir/earlier/N "
                            "first (nothing is deleted). Without it such a run is continued only by train.resume.")
    log_every: int = Field(1, gt=0, description="Steps between metric records.")
    eval_every: int = Field(0, ge=0, description="Steps between evals; 0 = only at the end.")
    eval_batches: int | None = Field(None, gt=0, description="Validation micro-batches scored per eval, counted "
                                     "over all data-parallel ranks together: the first eval_batches x "
                                     "micro_batch_size examples, the same at every layout; None = all.")
    eval_first: bool = Field(False, description="Also evaluate before the first step (logged as step 0).")
    save_every: int = Field(0, ge=0, description="Steps between checkpoints; 0 = only at the end.")
    save_final: bool = Field(True, description="Write a checkpoint at the end (benchmarks turn it off).")
    async_save: bool = Field(False, description="Checkpoints are copied to host memory at the step boundary "
                             "and written by a background thread while training goes on (one save in flight; "
                             "the next save, the end of the run or a stop signal waits for it). Costs host "
                             "memory for one copy of this rank's checkpoint share.")
    resume: str | None = Field(None, description="'auto' (latest in output_dir) or a checkpoint dir.")
    export_hf: bool = Field(True, description="Write output_dir/hf (save_pretrained) at the end.")
    export_max_shard_size: str = Field("2GB", pattern=r"^\s*[0-9]+(\.[0-9]+)?\s*([KMGT]B|[kmgt]b)\s*$",
                                       description="Largest weights file of the HF export (KB, MB, GB, TB): bigger "
                                       "models get model-0000k-of-0000n.safetensors + index, as save_pretrained "
                                       "writes; rank 0 holds one such file at a time.")
    progress: bool = Field(True, description="Progress bar on rank 0.")
    log_sample_ids: bool = Field(False, description="Each data-parallel rank's input reader appends the ids "
                                 "(indices into the packed training set) of the sequences of every step to "
                                 "output_dir/samples/rank-NNNNN.jsonl, with the elastic restart attempt: an audit "
                                 "that restarts skip and repeat no sample.")
    max_consecutive_skips: int = Field(10, gt=0, description="Steps with a non-finite loss or gradient are "
                                       "skipped on every rank (logged, counted in skipped_steps); this many in a "
                                       "row stop the run.")


    @field_validator("output_dir")
    @classmethod
    def _a_directory_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the run needs a directory of its own; name one, e.g. runs/my-run")
        return value

    @model_validator(mode="after")
    def _one_way_to_start(self):
        if self.overwrite and self.resume is not None:
            raise ValueError(f"train.overwrite=true starts again from step 0 and train.resume={self.resume} "
                             f"continues a checkpoint: set one of them")
        return self

    @property
    def derives_grad_accum(self) -> bool:
        """grad_accum comes from global_batch_size at launch (``for_world``)."""
        return self.global_batch_size is not None


class OptimConfig(_Section):
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps, then cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 disables.")
    fused: bool = Field(True, description="torch's fused AdamW kernel (HF Trainer's default, adamw_torch_fused): "
                        "the update without the foreach implementation's full-size temporaries, two fewer copies of "
                        "the optimizer partition at the step (bench/results/memory-cpu-steps). false: foreach.")


class EvalConfig(_Section):
    bleu: bool = Field(True, description="Encoder-decoder runs: generate for the validation sources and score "
                       "sacreBLEU against the targets at every eval.")
    num_beams: int = Field(1, ge=1, description="1 = greedy decoding; more = beam search.")
    max_new_tokens: int = Field(64, gt=0, description="Longest generated target.")
    bleu_samples: int | None = Field(None, gt=0, description="Validation examples to translate; None = all.")


class ParallelConfig(_Section):
    tensor: int = Field(1, ge=1, description="Tensor-parallel degree.")
    pipeline: int = Field(1, ge=1, description="Pipeline-parallel degree (stages).")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage over the data-parallel group.")
    overlap_comm: bool | None = Field(None, description="Reduce gradient buckets while the backward still runs "
                                      "(DeepSpeed's zero_optimization.overlap_comm). None: on for ZeRO-2/3, off for "
                                      "ZeRO-1 (2% slower with it on the 2-core CPU box, bench/results/overlap-cpu). "
                                      "Not with pipelines at ZeRO-1 (DeepSpeed refuses it). A user DeepSpeed JSON's "
                                      "own value wins.")
    bucket_size: int | None = Field(None, gt=0, description="Gradient elements per ZeRO bucket (DeepSpeed's "
                                    "zero_optimization.reduce_bucket_size and allgather_bucket_size). None: the "
                                    "model's hidden_size squared, HF Trainer's \"auto\" (and under ZeRO-3 "
                                    "stage3_prefetch_bucket_size 0.9 x hidden_size squared, "
                                    "stage3_param_persistence_threshold 10 x hidden_size), instead of DeepSpeed's "
                                    "500 M, which holds 2 GB per fp32 buffer whatever the model. ZeRO 1/2 stage "
                                    "gradients in a buffer of this size (two with overlap_comm). A user DeepSpeed "
                                    "JSON's own value wins; its \"auto\" means this default.")
    zero3_live_parameters: int | None = Field(None, gt=0, description="ZeRO-3: parameters kept gathered at once "
                                              "(DeepSpeed's stage3_max_live_parameters, where prefetching stops) "
                                              "and the distance in parameters under which a gathered one waits for "
                                              "its next use (stage3_max_reuse_distance). None: DeepSpeed's 1e9 each, "
                                              "which keeps every parameter of a smaller model gathered from its "
                                              "forward to its backward. Lower: less memory, less prefetch overlap "
                                              "(bench/results/memory-cpu). A user DeepSpeed JSON's own value wins.")
    offload: Literal["none", "optimizer", "optimizer+params"] = Field(
        "none", description="ZeRO offload to host memory (DeepSpeed's zero_optimization.offload_optimizer / "
        "offload_param): 'optimizer' keeps the fp32 master weights and AdamW moments on the CPU and steps them "
        "there (ZeRO 1-3); 'optimizer+params' also keeps the parameters there between uses (ZeRO-3). The "
        "optimizer is colonnade's torch AdamW on CPU tensors. A user DeepSpeed JSON's own offload sections win.")
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="Recompute activations in the backward (Megatron's modes): 'full' keeps only each "
        "transformer block's input and runs the block again; 'selective' recomputes only the core attention "
        "(scores, softmax, dropout, weighted sum). The recomputed dropout masks are the forward's.")
    schedule: Literal["gpipe", "1f1b", "interleaved", "zb-h1"] = Field(
        "1f1b", description="Pipeline schedule; zb-h1 splits the backward so that weight gradients fill 1F1B's "
                            "bubble (ZeRO-1/2).")
    virtual_stages: int = Field(1, ge=1, description="Model chunks per pipeline rank (interleaved schedule).")
    partition: str = Field("uniform", description="'uniform', 'parameters' (balanced by parameter count), "
                           "'measured' (balanced by each item's forward + backward time, probed before the run; "
                           "the chosen layout is printed and saved in output_dir/pipeline_partition.json) or a "
                           "layout string such as 'E,t,t|t,t,L' (E embedding, t block, L head + loss).")
    @field_validator("partition")
    @classmethod
    def _partition_method_or_layout(cls, value: str) -> str:
        if value not in PARTITION_METHODS and not set(value) <= set("Et,L| "):
            raise ValueError(f"expected one of {', '.join(PARTITION_METHODS)} or a layout string of E, t and L "
                             f"such as 'E,t,t|t,t,L' (stages separated by |)")
        return value

    p2p_timeout_s: float = Field(600.0, gt=0, description="A pipeline receive waiting longer fails the job.")
    timeout_s: float = Field(1800.0, gt=0, description="A collective (all-reduce, gather, ...) not complete after "
                             "this many seconds ends the job with an error naming the operation and the rank, "
                             "instead of hanging.")
    sequence_parallel: bool = Field(False, description="Megatron sequence parallelism (needs tensor > 1): "
                                    "norms and dropout work on a sequence shard; all-gather/reduce-scatter "
                                    "replace the all-reduces.")
    tp_async_grad_reduce: bool = Field(True, description="Tensor parallelism: launch the input-gradient "
                                       "all-reduce (reduce-scatter with sequence_parallel) asynchronously and "
                                       "compute the weight gradients while it runs (Megatron's asynchronous "
                                       "all-reduce); false waits for it first. Same gradients either way.")


class WandbConfig(_Section):
    mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline needs no network.")
    project: str = "colonnade"
    name: str | None = None
    group: str | None = None


class LoggingConfig(_Section):
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class RunConfig(_Section):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.optim.warmup_steps > self.train.steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} exceeds train.steps="
                             f"{self.train.steps}: lower the warm-up or train longer")
        self._check_zero_rules()
        self._check_pipeline_rules()
        self._check_model_kind_rules()
        return self

    def _check_zero_rules(self) -> None:
        par = self.parallel
        if par.pipeline > 1 and par.zero_stage == 0:
            raise ValueError(f"parallel.zero_stage=0 with parallel.pipeline={par.pipeline}: ZeRO-0 is not wired to "
                             f"the pipeline's deferred gradient reduction; set parallel.zero_stage=1, 2 or 3")
        if self.precision != "fp32" and par.zero_stage == 0:
            raise ValueError(f"precision={self.precision} with parallel.zero_stage=0: DeepSpeed then wraps AdamW in "
                             f"its fp16/bf16 optimizer, whose fp32 master weights and moments our layout-agnostic "
                             f"checkpoints do not read; use parallel.zero_stage=1 (the same memory at one data-parallel "
                             f"rank, sharded masters and moments at more)")
        if par.offload != "none" and par.zero_stage == 0:
            raise ValueError(f"parallel.offload={par.offload} needs ZeRO: DeepSpeed offloads the optimizer state of "
                             f"its ZeRO partitions (stages 1-3); set parallel.zero_stage=1, 2 or 3")
        if par.offload == "optimizer+params" and par.zero_stage != 3:
            raise ValueError(f"parallel.offload=optimizer+params with parallel.zero_stage={par.zero_stage}: "
                             f"DeepSpeed offloads parameters only under ZeRO-3, which partitions them; set "
                             f"parallel.zero_stage=3 or parallel.offload=optimizer")
        if par.zero_stage == 3 and par.tensor > 1 and par.pipeline > 1:
            raise ValueError("parallel.zero_stage=3 with both parallel.tensor>1 and parallel.pipeline>1 is not "
                             "supported: DeepSpeed's ZeRO-3 gradient norm ignores ds_pipe_replicated, so the last "
                             "stage's vocabulary-parallel copy of a tied embedding would be counted twice; use "
                             "zero_stage 1 or 2 for 3D layouts, or ZeRO-3 with only one of tensor / pipeline")

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


def _describe(error: dict) -> str:
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


def load(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
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


# ----------------------------------------------------------------------------------- DeepSpeed JSON

def data_parallel_size(cfg: RunConfig, world_size: int) -> int:
    """The data-parallel degree of ``world_size`` processes (``parallel.groups.check_degrees``' rule)."""
    try:
        return check_degrees(cfg.parallel.tensor, cfg.parallel.pipeline, world_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def for_world(cfg: RunConfig, world_size: int, first_start: bool = True) -> RunConfig:
    """``cfg`` for a launch of ``world_size`` processes: with ``train.global_batch_size`` its grad_accum derived
    (and checked, e.g. against the pipeline schedule); otherwise ``cfg`` itself. A ``train.grad_accum`` the YAML
    also sets must agree at the first start; an elastic restart (``first_start`` False) at another data-parallel
    size derives it as every start does."""
    if cfg.train.global_batch_size is None:
        return cfg
    dp, micro, total = data_parallel_size(cfg, world_size), cfg.train.micro_batch_size, cfg.train.global_batch_size
    where = (f"train.micro_batch_size={micro} x data-parallel size {dp} (world size {world_size} / tensor "
             f"{cfg.parallel.tensor} x pipeline {cfg.parallel.pipeline})")
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


def model_sized_buckets(hidden_size: int, zero_stage: int) -> dict[str, int]:
    """HF Trainer's "auto" ZeRO sizes from the model's hidden size (transformers/integrations/deepspeed.py,
    ``HfTrainerDeepSpeedConfig.trainer_config_finalize``): reduce_bucket_size hidden², and under ZeRO-3
    stage3_prefetch_bucket_size 0.9 hidden² and stage3_param_persistence_threshold 10 hidden.
    allgather_bucket_size (ZeRO 1/2's parameter all-gather after the step) follows reduce_bucket_size."""
    sizes = {"reduce_bucket_size": hidden_size**2, "allgather_bucket_size": hidden_size**2} if zero_stage else {}
    if zero_stage == 3:
        sizes.update(stage3_prefetch_bucket_size=int(0.9 * hidden_size**2),
                     stage3_param_persistence_threshold=10 * hidden_size)
    return sizes


def deepspeed_config(cfg: RunConfig, world_size: int, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for this run. The optimizer and LR schedule are built by colonnade from
    ``optim.*`` and handed to ``deepspeed.initialize``, so they are not in the JSON. Bucket sizes the config
    leaves to the model (``model_sized_buckets``) need ``hidden_size``; without it they are left out and
    ``training.engine.build`` fills them from the model it wraps."""
    dp = data_parallel_size(cfg, world_size)
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    zero: dict[str, Any] = {"stage": cfg.parallel.zero_stage}
    overlap = cfg.parallel.overlap_comm
    if cfg.parallel.zero_stage > 0:
        zero["overlap_comm"] = cfg.parallel.zero_stage >= 2 if overlap is None else overlap
    if hidden_size is not None:
        zero.update(model_sized_buckets(hidden_size, cfg.parallel.zero_stage))
    if cfg.parallel.zero_stage > 0 and cfg.parallel.bucket_size is not None:
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = cfg.parallel.bucket_size
    if cfg.parallel.zero_stage == 3:
        # Export and eval need full weights; gather them on save rather than keeping a 16-bit copy.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if cfg.parallel.zero3_live_parameters is not None:
            zero["stage3_max_live_parameters"] = zero["stage3_max_reuse_distance"] = cfg.parallel.zero3_live_parameters
    offload = {"device": "cpu", "pin_memory": True}  # pinned host memory: faster copies to and from a GPU
    if cfg.parallel.offload != "none":
        zero["offload_optimizer"] = dict(offload)
    if cfg.parallel.offload == "optimizer+params":
        zero["offload_param"] = dict(offload)
    return {
        "train_batch_size": micro * accum * dp,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW, built by us
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # Pipelines call backward once per micro-batch and chunk, then step() once: reduce there.
        **({"managed_gradient_accumulation": False} if cfg.parallel.pipeline > 1 else {}),
        # DeepSpeed refuses a client optimizer with offload unless told: ours steps on the CPU
        **({"zero_force_ds_cpu_optimizer": False} if cfg.parallel.offload != "none" else {}),
    }


# DeepSpeed's documented top-level keys; it silently ignores anything else, we do not.
DEEPSPEED_TOP_LEVEL_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler fp16 bf16
amp torch_autocast gradient_clipping prescale_gradients gradient_predivide_factor gradient_allreduce_op
sparse_gradients zero_optimization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer steps_per_print
wall_clock_breakdown dump_state flops_profiler activation_checkpointing sparse_attention data_efficiency
curriculum_learning aio tensorboard wandb csv_monitor comet comms_logger communication_data_type
seq_parallel_communication_data_type elasticity checkpoint data_types compression_training autotuning
pipeline memory_breakdown disable_allgather eigenvalue progressive_layer_drop quantize_training nebula
dataloader_drop_last timers graph_harvesting use_data_before_expert_parallelism zero_quantized_weights
zero_quantized_gradients hybrid_engine weight_quantization check_overflow managed_gradient_accumulation
disable_python_gc log_level
""".split())


def check_user_deepspeed_config(user: dict[str, Any], cfg: RunConfig, world_size: int,
                                source: str = "--deepspeed_config") -> dict[str, Any]:
    """Validate a user's DeepSpeed JSON against DeepSpeed's rules and the YAML; return the JSON to use.

    ``"auto"`` values (as in HF Trainer's integration) take colonnade's value. Raises ``ConfigError`` for
    unknown top-level keys, a violated batch rule (with the equation and world size) and every setting that
    disagrees with the YAML. Precision sections default to the YAML's ``precision``."""
    _check_top_level_keys(user, source)
    ours = deepspeed_config(cfg, world_size)
    user = _fill_auto(user, ours, cfg, source)
    micro, accum = _batch_sizes(user, cfg, world_size, source)
    mismatches = _disagreements(user, ours, cfg, micro, accum)
    if mismatches:
        raise ConfigError(f"{source} disagrees with the YAML config; make them agree (edit the JSON or "
                          f"use --set):\n" + "\n".join(f"  - {m}" for m in mismatches))
    return _merge(user, ours)


def _check_top_level_keys(user: dict[str, Any], source: str) -> None:
    for section in ("zero_optimization", "bf16", "fp16", "optimizer", "scheduler"):
        if section in user and not isinstance(user[section], dict):
            raise ConfigError(f"{source}: {section}={user[section]!r} must be a JSON object, e.g. "
                              f"\"{section}\": {{...}}")
    unknown = sorted(set(user) - DEEPSPEED_TOP_LEVEL_KEYS)
    if unknown:
        hints = []
        for key in unknown:
            near = difflib.get_close_matches(key, DEEPSPEED_TOP_LEVEL_KEYS, n=1, cutoff=0.6)
            hints.append(f"{key}" + (f" (did you mean {near[0]}?)" if near else ""))
        raise ConfigError(f"{source}: unknown top-level DeepSpeed keys: {', '.join(hints)}. DeepSpeed would "
                          f"silently ignore them; remove or rename them.")


# "auto" under these keys means the model-sized value (``model_sized_buckets``, as in HF Trainer): colonnade's
# when the generated JSON has it, else left out for ``training.engine.build`` to fill from the model.
_AUTO_MEANS_MODEL_SIZED = frozenset({"reduce_bucket_size", "allgather_bucket_size",
                                     "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"})


def _fill_auto(user: dict[str, Any], ours: dict[str, Any], cfg: RunConfig, source: str) -> dict[str, Any]:
    """A copy of ``user`` with every ``"auto"`` replaced by colonnade's value (HF Trainer's convention)."""
    optim = {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
             "weight_decay": cfg.optim.weight_decay}

    def fill(node: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        out = {}
        for key, value in node.items():
            where = path + (key,)
            if isinstance(value, dict):
                out[key] = fill(value, where)
            elif value != "auto":
                out[key] = value
            elif where[0] == "scheduler" or (key in _AUTO_MEANS_MODEL_SIZED and _lookup(ours, where) is None):
                continue  # our warm-up + cosine schedule / sized by the engine from the model
            elif where[:2] == ("optimizer", "params") and key in optim:
                out[key] = optim[key]
            elif _lookup(ours, where) is not None:
                out[key] = _lookup(ours, where)
            else:
                raise ConfigError(f"{source}: {'.'.join(where)}=\"auto\": colonnade has no value for it; "
                                  f"write the number (or remove the key for DeepSpeed's default)")
        return out

    return fill(user, ())


def _lookup(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _batch_sizes(user: dict[str, Any], cfg: RunConfig, world_size: int, source: str) -> tuple[Any, Any]:
    """(micro-batch, accumulation) the JSON implies; ``ConfigError`` when its batch rule cannot hold."""
    dp = data_parallel_size(cfg, world_size)
    total = user.get("train_batch_size")
    micro = user.get("train_micro_batch_size_per_gpu")
    accum = user.get("gradient_accumulation_steps")
    if total is not None and micro is not None and accum is not None and total != micro * accum * dp:
        raise ConfigError(
            f"{source}: DeepSpeed batch rule violated: train_batch_size ({total}) must equal "
            f"train_micro_batch_size_per_gpu ({micro}) x gradient_accumulation_steps ({accum}) x "
            f"data-parallel size ({dp}) = {micro * accum * dp}, with world size {world_size} = "
            f"tensor {cfg.parallel.tensor} x pipeline {cfg.parallel.pipeline} x data {dp}")
    known = micro if micro is not None else accum
    if total is not None and (micro is None) != (accum is None):
        if total % (known * dp):
            raise ConfigError(f"{source}: train_batch_size ({total}) is not divisible by "
                              f"{'train_micro_batch_size_per_gpu' if micro is not None else 'gradient_accumulation_steps'}"
                              f" ({known}) x data-parallel size ({dp}) (world size {world_size})")
        other = total // (known * dp)
        micro, accum = (known, other) if micro is not None else (other, known)
    return micro, accum


def _disagreements(user: dict[str, Any], ours: dict[str, Any], cfg: RunConfig, micro, accum) -> list[str]:
    mismatches = []

    def compare(ds_key: str, theirs: Any, yaml_key: str, mine: Any, shown: Any = None) -> None:
        if theirs is not None and theirs != mine:
            mismatches.append(f"{ds_key}={theirs!r} (DeepSpeed JSON) vs {yaml_key}="
                              f"{mine if shown is None else shown!r} (YAML)")

    compare("train_batch_size", user.get("train_batch_size"), "train.micro_batch_size x train.grad_accum x dp",
            ours["train_batch_size"])
    compare("train_micro_batch_size_per_gpu", micro, "train.micro_batch_size", cfg.train.micro_batch_size)
    compare("gradient_accumulation_steps", accum, "train.grad_accum", cfg.train.grad_accum)
    compare("gradient_clipping", user.get("gradient_clipping"), "optim.grad_clip", cfg.optim.grad_clip)
    compare("zero_optimization.stage", _lookup(user, ("zero_optimization", "stage")), "parallel.zero_stage",
            cfg.parallel.zero_stage)
    for name in ("bf16", "fp16"):
        compare(f"{name}.enabled", _lookup(user, (name, "enabled")), "precision", cfg.precision == name,
                shown=cfg.precision)
    params = _lookup(user, ("optimizer", "params")) or {}
    for key in ("lr", "eps", "weight_decay"):
        compare(f"optimizer.params.{key}", params.get(key), f"optim.{key}", getattr(cfg.optim, key))
    if "betas" in params:
        compare("optimizer.params.betas", tuple(params["betas"]), "optim.betas", cfg.optim.betas)
    if "optimizer" in user and str(user["optimizer"].get("type", "")).lower() not in ("adam", "adamw"):
        mismatches.append(f"optimizer.type={user['optimizer'].get('type')!r} (DeepSpeed JSON) vs AdamW "
                          f"(colonnade builds AdamW from optim.*)")
    if _lookup(user, ("scheduler", "params")):
        mismatches.append(f"scheduler.params={user['scheduler']['params']!r} (DeepSpeed JSON) would not be used: "
                          f"colonnade builds the warm-up + cosine schedule from optim.warmup_steps and "
                          f"optim.min_lr_ratio; remove the scheduler section or set its values to \"auto\"")
    return mismatches


def _offloads(user: dict[str, Any]) -> bool:
    return any(_lookup(user, ("zero_optimization", part, "device")) in ("cpu", "nvme")
               for part in ("offload_optimizer", "offload_param"))


def _merge(user: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """The user's JSON with colonnade's batch sizes, and its defaults where the user is silent."""
    merged = {k: v for k, v in user.items() if k not in ("optimizer", "scheduler")}
    merged.update({k: ours[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                        "gradient_accumulation_steps", "zero_allow_untested_optimizer")})
    for key in ("gradient_clipping", "steps_per_print"):
        merged.setdefault(key, ours[key])
    merged["zero_optimization"] = {**ours["zero_optimization"], **user.get("zero_optimization", {})}
    for name in ("bf16", "fp16"):  # the YAML's precision unless the JSON says (the same, checked above)
        merged[name] = {**ours[name], **user.get(name, {})}
    if "managed_gradient_accumulation" in ours:
        merged["managed_gradient_accumulation"] = False
    if _offloads(merged):  # DeepSpeed refuses a client optimizer with offload unless told: ours steps on the CPU
        merged.setdefault("zero_force_ds_cpu_optimizer", False)
    return merged


def load_user_deepspeed_config(path: str | Path, cfg: RunConfig, world_size: int) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed_config {path}: file does not exist")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON: {exc}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"--deepspeed_config {path}: expected a JSON object")
    return check_user_deepspeed_config(user, cfg, world_size, source=f"--deepspeed_config {path}")
