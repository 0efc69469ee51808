"""Shard a Hugging Face model for tensor parallelism by its plan (``modeling.tp_plans``): ``apply_tp_plan`` swaps
the modules the plan names for ``parallel.layers``' layers, slicing the dense weights (``nn.Linear``, or
``Conv1D``, stored (in, out): handed over transposed, marked ``hf_conv1d`` for ``modeling.shards``), enters the
region where the plan says (hooks on ``hidden_states`` / ``key_value_states``) and, for a hand-written plan, fails
on any parameter it does not cover. A declared plan's attention modules count this rank's heads; norms over a
split width become ``parallel.norms``; scaled embeddings keep their scale. Sequence parallelism splits the hidden
states from the first block's input to the last's output. Replicated parameters fed by this rank's part only
(sequence shard, heads, columns) sum their gradients over the tensor group."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from modeling.tp_plans import COLUMN_STYLES, HEAD_COUNTS, TPPlan, check_tensor_parallel_fits, plan_for
from parallel.comm import (
    SEQ_DIM,
    all_reduce,
    comm_device,
    gather_from_tensor_parallel_region,
    scatter_to_sequence_parallel_region,
)
from parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    mark_sharded,
    shard_rows,
)
from parallel.norms import ShardedRMSNorm
from parallel.random import TensorParallelRNG
from parallel.random import install as install_dropout_rng
from parallel.region import RegionEntry


def tensor_parallelize(model: PreTrainedModel, tp_group: ProcessGroup | None, sequence_parallel: bool = False,
                       async_grad_reduce: bool = False, dropout_seed: int | None = None) -> PreTrainedModel:
    """Shard ``model`` in place over ``tp_group`` by its architecture's plan (no-op for one rank). With
    ``dropout_seed``, dropout on split data draws from this rank's own generator (``parallel.random``), kept
    in ``model.tensor_parallel_rng`` for the checkpoints and the recomputation."""
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    if world == 1:
        return model
    check_tensor_parallel_fits(model.config, world)
    plan = plan_for(model)
    apply_tp_plan(model, plan, tp_group, sequence_parallel, async_grad_reduce)
    if dropout_seed is not None:
        rng = TensorParallelRNG(dropout_seed, dist.get_rank(tp_group), comm_device(tp_group))
        blocks = model.get_submodule(plan.blocks) if isinstance(plan.blocks, str) and sequence_parallel else None
        install_dropout_rng(model, rng, blocks)  # sequence parallelism: decoders only
        model.tensor_parallel_rng = rng  # type: ignore[assignment]  # torch's stub: Module attributes Tensor | Module only
    return model


def check_sequence_parallel_fits(model: PreTrainedModel) -> None:
    """Sequence parallelism runs everything outside the regions on this rank's part of the sequence: an
    attention the plan does not split (Youtu's latent attention) would attend within the part. ValueError
    naming it (checked on the meta model, at config time)."""
    plan = plan_for(model)
    if not isinstance(plan.blocks, str):
        return  # encoder-decoder models: sequence parallelism is refused by the config check
    block = f"{plan.blocks}.0"
    regions = [name for name, _ in model.named_modules() if "region" in _matches(plan.styles, name)]
    for name, module in model.get_submodule(block).named_modules(prefix=block):
        inside = any(name == r or name.startswith(r + ".") for r in regions)
        if type(module).__name__.endswith("Attention") and not inside:
            raise ValueError(f"parallel.sequence_parallel=true: {name} ({type(module).__name__}) is not split by "
                             f"the tensor-parallel plan, so it would attend within one rank's part of the "
                             f"sequence; turn parallel.sequence_parallel off")


def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$")


def _matches(plan_map: dict[str, Any], name: str) -> list[Any]:
    return [value for pattern, value in plan_map.items() if _regex(pattern).match(name)]


def _dense_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(weight in nn.Linear layout, bias, was_conv1d). transformers' Conv1D stores (in, out)."""
    if isinstance(module, Conv1D) or type(module).__name__ == "Conv1D":  # remote-code models carry copies of it
        conv: Any = module
        return conv.weight.detach().t(), (None if conv.bias is None else conv.bias.detach()), True
    if isinstance(module, nn.Linear):
        return module.weight.detach(), (None if module.bias is None else module.bias.detach()), False
    raise TypeError(f"cannot shard {type(module).__name__}: expected nn.Linear or Conv1D")


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every path of each module object: encoder-decoder models reach one shared embedding by several."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


Hook = Callable[..., Any]


def _replace_hidden_states(args: tuple, kwargs: dict[str, Any],
                           fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[tuple, dict[str, Any]]:
    """Apply ``fn`` to the hidden states a module is called with, and to the encoder states a
    cross-attention is called with (``key_value_states``), whose gradient is partial on each rank too."""
    if "hidden_states" in kwargs:
        kwargs = dict(kwargs, hidden_states=fn(kwargs["hidden_states"]))
    else:
        args = (fn(args[0]),) + tuple(args[1:])
    if isinstance(kwargs.get("key_value_states"), torch.Tensor):
        kwargs = dict(kwargs, key_value_states=fn(kwargs["key_value_states"]))
    return args, kwargs


def _enter_region_at_input(module: nn.Module, group: ProcessGroup | None, sequence_parallel: bool,
                           async_grad_reduce: bool) -> None:
    """``module``'s input enters the region once for the column layers inside it (q|k|v, gate|up)."""
    layers = [m for m in module.modules() if isinstance(m, ColumnParallelLinear) and m.entry is None]
    entry = RegionEntry(group, layers, sequence_parallel, async_grad_reduce)
    module.register_forward_pre_hook(lambda mod, args, kwargs: _replace_hidden_states(args, kwargs, entry),
                                     with_kwargs=True)


def _sequence_scatter_hook(group: ProcessGroup | None) -> Hook:
    return lambda module, args, kwargs: _replace_hidden_states(
        args, kwargs, lambda h: scatter_to_sequence_parallel_region(h, group))


def _sequence_gather_hook(group: ProcessGroup | None) -> Hook:
    """After the last block the sequence is gathered for the replicated final norm and the head (which
    enters the region itself): backward keeps this rank's chunk, since every rank holds the full gradient."""
    def gather(h: torch.Tensor) -> torch.Tensor:
        return gather_from_tensor_parallel_region(h, group, dim=SEQ_DIM)

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return (gather(output[0]),) + output[1:] if isinstance(output, tuple) else gather(output)

    return hook


def apply_tp_plan(model: PreTrainedModel, plan: TPPlan, group: ProcessGroup | None, sequence_parallel: bool = False,
                  async_grad_reduce: bool = False) -> PreTrainedModel:
    """Shard ``model`` in place for this rank of ``group``; returns it. With a hand-written plan every
    parameter afterwards is either sharded (``tensor_model_parallel``) or declared replicated by the plan, else
    ValueError. ``async_grad_reduce``: see ``parallel.region``."""
    world = 1 if group is None else dist.get_world_size(group)
    tied: dict[str, nn.Parameter] = {}
    swaps: list[tuple[list[str], nn.Module]] = []
    regions: list[nn.Module] = []
    aliases = _aliases(model)
    for name, module in model.named_modules():
        styles = _matches(plan.styles, name)
        if len(styles) > 1:
            raise ValueError(f"module {name} matches several TP styles: {styles}")
        style = styles[0] if styles else None
        _divide_attributes(module, name, [a for attrs in _matches(plan.divide_attributes, name) for a in attrs], world)
        if style in (*COLUMN_STYLES, "rowwise", "vocab_head"):
            swaps.append((aliases[id(module)], _parallel_linear(module, name, cast(str, style), model.config, group,
                                                                sequence_parallel, async_grad_reduce)))
            if style == "vocab_head":
                tied[name] = module.weight
        elif style == "vocab_embedding":
            embedding = VocabParallelEmbedding.from_dense(module.weight.detach(), group=group,
                                                          padding_idx=getattr(module, "padding_idx", None))
            _keep_embedding_scale(module, embedding)
            tied[name] = module.weight
            swaps.append((aliases[id(module)], embedding))
        elif style == "region" and any(inner != "region" for child, _ in module.named_children()
                                       for inner in _matches(plan.styles, f"{name}.{child}")):
            regions.append(module)  # it holds a split layer: a MoE block that ``layers.*.mlp`` names does not
        elif style == "heads_embedding":
            _shard_heads_embedding(cast(nn.Embedding, module), group)
    for names, new in swaps:
        for name in names:
            _set_submodule(model, name, new)
    _retie(model, tied)
    if plan.declared:
        _shard_head_parameters(model, plan, group)
    for module in regions:
        if plan.declared:
            _shard_head_counts(module, world)
            _shard_full_width_norms(module, group)
        _enter_region_at_input(module, group, sequence_parallel, async_grad_reduce)
    for name in plan.vocab_buffers:
        _shard_vocab_buffer(model, name, cast(VocabParallelHead, model.get_output_embeddings()))
    if not plan.declared:
        _check_covered(model, plan)
    if sequence_parallel:
        _split_sequence_between_blocks(model, plan, group)
    _sum_partial_grads(model, plan, group, sequence_parallel, regions)
    return model


def _keep_embedding_scale(dense: nn.Module, parallel: nn.Module) -> None:
    """transformers' scaled word embeddings (Gemma's sqrt(hidden)) multiply their output by ``embed_scale``, cast
    to the output's dtype first: the vocabulary-parallel embedding does the same, with the scale rounded to that
    dtype on the host once (a Python number: no copy to the device per forward)."""
    scale = getattr(dense, "scalar_embed_scale", getattr(dense, "embed_scale", None))
    if not isinstance(scale, (int, float)) or scale == 1.0:
        return
    rounded: dict[torch.dtype, float] = {}

    def scaled(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if out.dtype not in rounded:
            rounded[out.dtype] = float(torch.tensor(scale, dtype=out.dtype))
        return out * rounded[out.dtype]

    parallel.register_forward_hook(scaled)


def _shard_head_parameters(model: nn.Module, plan: TPPlan, group: ProcessGroup | None) -> None:
    """A declared ``colwise`` on a parameter rather than a layer (Granite's per-head attention sinks): this rank
    keeps the rows of its heads."""
    for name, param in list(model.named_parameters()):
        if "colwise" in _matches(plan.styles, name):
            owner_name, _, attr = name.rpartition(".")
            local = nn.Parameter(shard_rows(param.detach(), group))
            mark_sharded(local, 0, param.shape[0])
            setattr(model.get_submodule(owner_name), attr, local)


def _divide_attributes(module: nn.Module, name: str, attributes: list[str], world: int) -> None:
    for attr in attributes:
        value = getattr(module, attr)
        if value % world:
            raise ValueError(f"{name}.{attr}={value} is not divisible by the tensor-parallel size {world}")
        setattr(module, attr, value // world)


def _parallel_linear(module: nn.Module, name: str, style: str, config: Any, group: ProcessGroup | None,
                     sequence_parallel: bool, async_grad_reduce: bool) -> nn.Module:
    """The tensor-parallel layer of ``style`` cut from the dense ``module``."""
    weight, bias, was_conv1d = _dense_linear(module)
    new: nn.Module
    if style == "rowwise":
        new = RowParallelLinear.from_dense(weight, bias, group=group, sequence_parallel=sequence_parallel)
    elif style == "vocab_head":
        new = VocabParallelHead.from_dense(weight, bias, group=group,  # input: full sequence
                                           async_grad_reduce=async_grad_reduce)
    else:
        new = ColumnParallelLinear.from_dense(weight, bias, group=group, enter_region=style == "colwise_enter",
                                              async_grad_reduce=async_grad_reduce,
                                              fused_chunks=_fused_blocks(style, name, weight.shape[0], config))
        new.tp_gathered = style == "colwise_gathered"  # type: ignore[assignment]  # read by _shard_full_width_norms
    new.hf_conv1d = was_conv1d  # type: ignore[assignment]  # (torch's stub, as above) the shard contract's mark
    return new


def _fused_blocks(style: str, name: str, out_features: int, config: Any) -> Any:
    """How a column layer's output dimension is made of blocks, each split by heads: a count of equal blocks, or
    their sizes. A layer transformers gathers (``colwise_gathered``) may hold q|k|v (unequal under GQA: Phi-3's
    ``qkv_proj``) or gate|up (``gate_up_proj``)."""
    if style == "colwise_fused3":
        return 3
    if style == "colwise_packed":
        return 2
    layer = name.rsplit(".", 1)[-1]
    if style == "colwise_gathered" and "qkv" in layer:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if out_features != (heads + 2 * kv) * head_dim:
            raise ValueError(f"{name}: {out_features} outputs are not q|k|v of {heads} + 2 x {kv} heads of "
                             f"{head_dim}; colonnade cannot cut it per block; use parallel.tensor=1")
        return (heads * head_dim, kv * head_dim, kv * head_dim)
    if style == "colwise_gathered" and "gate_up" in layer:
        return 2
    return 1


class _ShardConfig:
    """A module's view of the model config with the head counts of this rank (forwards that read them)."""

    def __init__(self, config: Any, world: int):
        self._config = config
        self._heads = {key: value // world for key in HEAD_COUNTS
                       if isinstance(value := getattr(config, key, None), int)}

    def __getattr__(self, name: str) -> Any:
        heads = self.__dict__["_heads"]
        return heads[name] if name in heads else getattr(self.__dict__["_config"], name)


def _shard_head_counts(module: nn.Module, world: int) -> None:
    """A region module of a declared plan counts this rank's heads: its head-count attributes and its config."""
    _divide_attributes(module, type(module).__name__,
                       [a for a in HEAD_COUNTS if isinstance(getattr(module, a, None), int)], world)
    if hasattr(module, "config"):
        module.config = _ShardConfig(module.config, world)  # type: ignore[assignment]


def _shard_full_width_norms(module: nn.Module, group: ProcessGroup | None) -> None:
    """A norm over the full output of a column layer transformers gathers (OLMo 2's q/k norms) becomes a norm
    over this rank's slice with the statistic of the full width (``parallel.norms``)."""
    widths = {child.out_features for child in module.children()
              if isinstance(child, ColumnParallelLinear) and getattr(child, "tp_gathered", False)}
    for name, child in list(module.named_children()):
        weight = getattr(child, "weight", None)
        if isinstance(child, ColumnParallelLinear) or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            continue
        if weight.shape[0] not in widths:
            continue
        eps = getattr(child, "variance_epsilon", getattr(child, "eps", None))
        if eps is None or getattr(child, "bias", None) is not None:
            raise ValueError(f"{type(child).__name__} over the full width of a split layer: only an RMS norm "
                             f"(weight, eps) can be split; use parallel.tensor=1")
        setattr(module, name, ShardedRMSNorm.from_dense(weight.detach(), float(eps), group))


def _split_sequence_between_blocks(model: nn.Module, plan: TPPlan, group: ProcessGroup | None) -> None:
    """Sequence parallelism: the hidden state is split along the sequence from the first block's input to the
    last block's output."""
    if not isinstance(plan.blocks, str):
        raise ValueError("sequence parallelism is implemented for decoder-only models")
    blocks = cast(nn.ModuleList, model.get_submodule(plan.blocks))
    blocks[0].register_forward_pre_hook(_sequence_scatter_hook(group), with_kwargs=True)
    blocks[-1].register_forward_hook(_sequence_gather_hook(group))


def _sum_partial_grads(model: nn.Module, plan: TPPlan, group: ProcessGroup | None, sequence_parallel: bool,
                       regions: list[nn.Module]) -> None:
    """Replicated parameters fed by this rank's part only sum their gradients over the group, once each: with
    sequence parallelism every one inside the blocks (this rank's part of the sequence); the ones the plan says
    are fed by this rank's heads (``replicate_reduce_grad``); in a declared plan every one inside a region (q/k
    norms per head, an activation's own parameters between the column and the row layer), but the row layer's
    bias, added after the reduction."""
    partial: dict[int, nn.Parameter] = {}
    if sequence_parallel:
        partial.update({id(p): p for p in model.get_submodule(cast(str, plan.blocks)).parameters()})
    fed_by_part = [module for name, module in model.named_modules()
                   if "replicate_reduce_grad" in _matches(plan.styles, name)] + (regions if plan.declared else [])
    for module in fed_by_part:
        partial.update({id(p): p for m in module.modules() if not isinstance(m, RowParallelLinear)
                        for p in m.parameters(recurse=False)})
    for param in partial.values():
        if not getattr(param, "tensor_model_parallel", False):
            param.register_hook(lambda grad: all_reduce(grad.clone(), group))


def _shard_heads_embedding(module: nn.Embedding, group: ProcessGroup | None) -> None:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    full = module.weight.detach()
    if full.shape[1] % world:
        raise ValueError(f"an embedding over {full.shape[1]} attention heads does not split {world} ways")
    module.weight = nn.Parameter(full.chunk(world, dim=1)[rank].clone())
    module.embedding_dim = module.weight.shape[1]
    mark_sharded(module.weight, 1, full.shape[1])


def _shard_vocab_buffer(model: nn.Module, name: str, head: VocabParallelHead) -> None:
    """Slice a (..., vocab) buffer to the head's rows (zeros on padding rows); marked for export."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    full = getattr(owner, attr)
    local = full.new_zeros(*full.shape[:-1], head.weight.shape[0])
    local[..., :head.valid_rows] = full[..., head.vocab_start:head.vocab_start + head.valid_rows]
    setattr(owner, attr, local)
    mark_sharded(local, local.dim() - 1, full.shape[-1])


def _retie(model: nn.Module, dense_weights: dict[str, nn.Parameter]) -> None:
    """Input and output embeddings that shared one dense weight share one sharded weight again."""
    names = list(dense_weights)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if dense_weights[a] is dense_weights[b]:
                model.get_submodule(b).weight = model.get_submodule(a).weight


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _check_covered(model: nn.Module, plan: TPPlan) -> None:
    replicated = {p for p, s in plan.styles.items() if s == "replicate"}
    missing = []
    for name, param in model.named_parameters():
        if getattr(param, "tensor_model_parallel", False):
            continue
        if _owner(name) and _matches({p: True for p in replicated}, _owner(name)):
            continue
        if isinstance(model.get_submodule(_owner(name)) if _owner(name) else model, RowParallelLinear):
            continue  # its bias is added after the reduction: replicated by construction
        missing.append(name)
    if missing:
        raise ValueError(f"TP plan covers neither sharding nor replication for parameters {missing}; add a "
                         f"style for their modules to the plan")
