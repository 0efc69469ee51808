"""Read and write the optimizer state of one parameter, whole, whatever ZeRO stage holds it.

AdamW keeps ``exp_avg`` and ``exp_avg_sq`` per parameter and, in mixed precision, an fp32 master copy.
ZeRO 1/2 keep them for a flat fp32 partition per parameter group, split over the data-parallel group;
ZeRO-3 partitions them per parameter; ZeRO-0 is plain AdamW. These functions hide that: ``get`` returns
the tensor shaped like this rank's parameter (its tensor-parallel shard, gathered over data parallelism, on
the parameter's device), ``put`` writes one. Only trainable parameters have optimizer state. Both are
collective over the data-parallel group for ZeRO 1-3. ``owned_part`` is what a checkpoint stores: the flat
range of a parameter (its weights or a state) that this rank alone holds, with no communication; a resume
writes each rank's range back with ``held_range`` / ``put_range``, from only that range's values.

ZeRO 1/2 create AdamW's state lazily at the first step and only then link each parameter to its slice
of it; resuming needs the state before that, so the slices are addressed here from DeepSpeed's
fragment addresses (``param._hp_mapping``), the same ones its universal checkpoint uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

MOMENTS = ("exp_avg", "exp_avg_sq")
# A parameter (or buffer) with the attributes DeepSpeed gives it (ds_tensor, ds_numel, _hp_mapping, ...), which
# torch's stubs do not know.
ZeroTensor = Any


def base_optimizer(engine: DeepSpeedEngine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO / mixed-precision wrapper (the engine's own at ZeRO-0)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def zero_stage(engine: DeepSpeedEngine) -> int:
    """The ZeRO stage of the optimizer object ``engine`` holds: the run's ``parallel.zero_stage``, which its
    DeepSpeed JSON carries (``training.deepspeed_config``) and ``training.engine.build`` checks. The checkpoint
    package, which is handed the engine and not the config, reads it here only."""
    return int(engine.zero_optimization_stage())


def _new_state(state: dict, like: torch.Tensor) -> dict:
    """AdamW's state for ``like`` as it is before the first step: step 0, zero moments."""
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        for key in MOMENTS:
            state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
    return state


def _ensure_zero3_state(engine) -> None:
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        _new_state(base_optimizer(engine).state[flat], flat)


def _flat_state(engine, param) -> dict:
    """AdamW's state of the flat fp32 partition that holds ``param``'s fragment (ZeRO 1/2), created as
    zeros if no step has run yet."""
    zero = engine.optimizer
    flat = zero.single_partition_of_fp32_groups[param._hp_mapping.param_group_index]
    return _new_state(base_optimizer(engine).state[flat], flat)


def _fragment(engine, param, key: str) -> torch.Tensor:
    """The slice of the flat partition (master weight or moment) that belongs to ``param`` on this rank."""
    mapping = param._hp_mapping
    if key == "master":
        return mapping.hp_fragment
    hp = mapping.hp_fragment_address
    return _flat_state(engine, param)[key].narrow(0, hp.start, hp.numel)


def _lp_range(param) -> slice:
    lp = param._hp_mapping.lp_fragment_address
    return slice(lp.start, lp.start + lp.numel)


def get(engine: DeepSpeedEngine, param: ZeroTensor, key: str) -> torch.Tensor:
    """``key`` in MOMENTS or 'master' (the fp32 weight the optimizer updates), shaped like ``param``."""
    stage = zero_stage(engine)
    if stage == 3:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        _ensure_zero3_state(engine)
        value = safe_get_full_fp32_param(param) if key == "master" else safe_get_full_optimizer_state(param, key)
        return value.detach().float()
    if stage == 0:
        if key == "master":
            return param.detach().float()
        state = base_optimizer(engine).state.get(param, {})
        return state[key].detach().float() if key in state else torch.zeros_like(param, dtype=torch.float32)
    full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
    if param._hp_mapping is not None:
        full[_lp_range(param)] = _fragment(engine, param, key).flatten()
    dist.all_reduce(full, group=param._dp_group)
    return full.view_as(param)


def put(engine: DeepSpeedEngine, param: ZeroTensor, key: str, value: torch.Tensor) -> None:
    """Write ``value`` (shaped like ``param``) as ``param``'s ``key`` (MOMENTS or 'master')."""
    stage = zero_stage(engine)
    if stage == 3:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        _ensure_zero3_state(engine)
        value = value.to(param.device, torch.float32)
        if key == "master":
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    if stage == 0:
        with torch.no_grad():
            if key == "master":
                param.copy_(value)
                return
            _new_state(base_optimizer(engine).state[param], param)[key].copy_(value)
        return
    if param._hp_mapping is None:
        return  # this rank's partition holds no fragment of the parameter
    with torch.no_grad():
        _fragment(engine, param, key).copy_(value.to(param.device, torch.float32).flatten()[_lp_range(param)])


def held_range(engine: DeepSpeedEngine, param: ZeroTensor) -> tuple[int, int] | None:
    """The flat range of ``param`` (its tensor-parallel shard, flattened) whose optimizer state this rank
    holds, or None: its ZeRO partition (ZeRO 1/2: the fragment in its flat partition; ZeRO-3: its partition,
    padding excluded), the whole parameter at ZeRO-0."""
    stage, numel = zero_stage(engine), getattr(param, "ds_numel", param.numel())
    if stage == 3:
        start = dist.get_rank(param.ds_process_group) * param.ds_tensor.ds_numel
        return (start, min(numel, start + param.ds_tensor.ds_numel)) if start < numel else None
    if stage in (1, 2):
        if param._hp_mapping is None:
            return None
        lp = _lp_range(param)
        return lp.start, lp.stop
    return 0, numel


def put_range(engine: DeepSpeedEngine, param: ZeroTensor, key: str, values: torch.Tensor) -> None:
    """Write ``values``, the flat ``held_range`` of ``param``'s ``key`` (MOMENTS or 'master'), into this
    rank's optimizer state; no communication."""
    stage = zero_stage(engine)
    if stage == 0:
        put(engine, param, key, values.view_as(param))
        return
    if stage == 3:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        _ensure_zero3_state(engine)
        padded = torch.zeros(param.ds_tensor.ds_numel, dtype=torch.float32, device=param.ds_tensor.device)
        padded[:values.numel()] = values  # the last partition's padding stays zero
        if key == "master":
            safe_set_local_fp32_param(param, padded)
        else:
            safe_set_local_optimizer_state(param, padded, key)
        return
    with torch.no_grad():
        _fragment(engine, param, key).view(-1).copy_(values.to(param.device, torch.float32))


def owned_part(engine: DeepSpeedEngine, tensor: ZeroTensor, key: str, dp_rank: int,
               dp_world: int) -> tuple[int, torch.Tensor] | None:
    """(first element, values) of the flattened ``tensor`` that this data-parallel rank stores for ``key``
    ('model' for the weights or buffer, else an optimizer state) and no other replica does, or None: its ZeRO
    partition (ZeRO-3: of every tensor; ZeRO 1/2: of trainable parameters, where the optimizer partitioned
    them), else an even share of the replicated tensor. Values are views; nothing is communicated."""
    stage, numel = zero_stage(engine), getattr(tensor, "ds_numel", tensor.numel())
    if stage == 3 and hasattr(tensor, "ds_tensor") and (key == "model" or tensor.requires_grad):
        values = tensor.ds_tensor if key == "model" else _zero3_local_state(engine, tensor, key)
        start = dist.get_rank(tensor.ds_process_group) * tensor.ds_tensor.ds_numel
        return _non_empty(start, values.detach().reshape(-1)[:max(0, min(values.numel(), numel - start))])
    if stage in (1, 2) and tensor.requires_grad:
        if tensor._hp_mapping is None:
            return None
        lp = _lp_range(tensor)
        values = tensor.detach().reshape(-1)[lp] if key == "model" else _fragment(engine, tensor, key).reshape(-1)
        return _non_empty(lp.start, values)
    share = -(-numel // dp_world)
    start = min(dp_rank * share, numel)
    values = tensor.detach() if key == "model" else get(engine, tensor, key)  # ZeRO-0: no communication
    return _non_empty(start, values.reshape(-1)[start:start + share])


def _zero3_local_state(engine, param, key: str) -> torch.Tensor:
    """This rank's flat partition of a ZeRO-3 parameter's fp32 master ('master') or AdamW state."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    _ensure_zero3_state(engine)
    return safe_get_local_fp32_param(param) if key == "master" else safe_get_local_optimizer_state(param, key)


def _non_empty(start: int, values: torch.Tensor):
    return (start, values) if values.numel() else None


def optimizer_steps(engine: DeepSpeedEngine) -> int:
    """AdamW's step count (the bias-correction exponent): applied updates, skipped steps excluded."""
    for state in base_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def set_optimizer_steps(engine: DeepSpeedEngine, steps: int) -> None:
    """Give every AdamW state the restored step count (states are created by ``put`` first)."""
    for state in base_optimizer(engine).state.values():
        if "step" in state:
            state["step"] = torch.tensor(float(steps), dtype=torch.float32)
