"""The DeepSpeed JSON of a run: generated from the ``RunConfig`` (:func:`deepspeed_config`) or, when a user brings
their own (``--deepspeed_config``), checked against it and completed (:func:`load_user_deepspeed_config`).

The ZeRO stage has one source: ``cfg.parallel.zero_stage``. The generated JSON copies it; a user's JSON that names
another stage is refused, and one that leaves it out or writes "auto" gets it, so the engine's
``zero_optimization_stage()`` always equals it and the run reads the stage from the config only.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from training.config import ConfigError, RunConfig, data_parallel_size


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
    if cfg.parallel.zero_stage > 0 and cfg.parallel.grad_compression != "none":
        # the compressed mean replaces average_tensor, which DeepSpeed calls on contiguous buckets
        zero.update(overlap_comm=False, contiguous_gradients=True)
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
    optim: dict[str, Any] = {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
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
    node: Any = tree
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _batch_sizes(user: dict[str, Any], cfg: RunConfig, world_size: int, source: str) -> tuple[Any, Any]:
    """(micro-batch, accumulation) the JSON implies; ``ConfigError`` when its batch rule cannot hold."""
    dp = data_parallel_size(cfg, world_size)
    total = user.get("train_batch_size")
    micro: Any = user.get("train_micro_batch_size_per_gpu")
    accum: Any = user.get("gradient_accumulation_steps")
    if total is not None and micro is not None and accum is not None and total != micro * accum * dp:
        raise ConfigError(
            f"{source}: DeepSpeed batch rule violated: train_batch_size ({total}) must equal "
            f"train_micro_batch_size_per_gpu ({micro}) x gradient_accumulation_steps ({accum}) x "
            f"data-parallel size ({dp}) = {micro * accum * dp}, with world size {world_size} = "
            f"tensor {cfg.parallel.tensor} x pipeline {cfg.parallel.pipeline} x data {dp}")
    known = micro if micro is not None else accum
    if total is not None and (micro is None) != (accum is None):
        if total % (known * dp):
            name = "train_micro_batch_size_per_gpu" if micro is not None else "gradient_accumulation_steps"
            raise ConfigError(f"{source}: train_batch_size ({total}) is not divisible by {name} ({known}) x "
                              f"data-parallel size ({dp}) (world size {world_size})")
        other = total // (known * dp)
        micro, accum = (known, other) if micro is not None else (other, known)
    return micro, accum


def _disagreements(user: dict[str, Any], ours: dict[str, Any], cfg: RunConfig, micro: Any,
                   accum: Any) -> list[str]:
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
    if cfg.parallel.grad_compression != "none":
        for key, needed in (("overlap_comm", False), ("contiguous_gradients", True)):
            compare(f"zero_optimization.{key}", _lookup(user, ("zero_optimization", key)),
                    "parallel.grad_compression", needed, shown=cfg.parallel.grad_compression)
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
    # the run's stage, exactly (a different one was refused above; true or 2.0 would pass that check)
    merged["zero_optimization"]["stage"] = ours["zero_optimization"]["stage"]
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
