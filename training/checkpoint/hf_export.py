"""The end-of-run Hugging Face export from the live engine: every weight merged (tensor parallel), gathered (ZeRO-3)
and sent to rank 0 one tensor at a time, which streams them into ``from_pretrained``-loadable shard files
(``hf_files``) in a directory written atomically (``files.write_export``). ``python -m training.checkpoint.export``
does the same from a saved checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from modeling.shards import full_tensor as merge_tensor
from parallel.comm import comm_device
from training.checkpoint import files, hf_files, optimizer_state
from training.checkpoint.holdings import holdings
from training.rank0 import on_rank0

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from parallel.groups import ProcessGroups


def export_hf(engine: DeepSpeedEngine, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
              out_dir: str | Path, groups: ProcessGroups,
              max_shard_size: str = hf_files.DEFAULT_MAX_SHARD_SIZE) -> Path | None:
    """Write a ``from_pretrained``-loadable directory (sharded safetensors + config + tokenizer), atomically;
    ``out_dir`` must be new, empty, or an earlier export of ours, else a ``CheckpointError`` on every rank and
    nothing changed. The weights are gathered one tensor at a time and rank 0 writes one shard file at a time."""
    out_dir = Path(out_dir)
    plan, tensor_of = _streamed_weights(engine, model, groups, max_shard_size)
    on_rank0(lambda: files.check_export_target(out_dir, fix=_EXPORT_FIX), f"exporting to {out_dir}")

    def write(tmp: Path) -> None:
        hf_files.write_weights(tmp, plan, tensor_of)
        hf_files.write_config_files(tmp, model.config, tokenizer)

    # A refusal is a CheckpointError, raised by on_rank0 on every rank; train.py prints it and exits 2.
    on_rank0(lambda: files.write_export(out_dir, write, fix=_EXPORT_FIX), f"exporting to {out_dir}",
             others=lambda: hf_files.write_weights(None, plan, tensor_of))
    return out_dir


def _streamed_weights(engine: DeepSpeedEngine, model: PreTrainedModel, groups: ProcessGroups,
                      max_shard_size: str) -> tuple[hf_files.WeightsPlan, Callable[[str], torch.Tensor | None]]:
    """(the shard plan of the full weights, ``tensor_of(name)``: the full HF-layout tensor on global rank 0,
    None elsewhere). Every rank must call ``tensor_of`` for the same names in the same order: the owning
    stage's tensor-parallel ranks merge their shards (ZeRO-3: the data-parallel ranks gather the partitions),
    and a later stage sends the result to rank 0; data-parallel replicas of a full copy take no part."""
    zero3 = optimizer_state.zero_stage(engine) == 3
    parameters = {n for n, _ in model.named_parameters()}
    local, owner, spec = holdings(engine, model, groups)

    def tensor_of(name: str) -> torch.Tensor | None:
        stage, source = owner[name], groups.pp_ranks[owner[name]]
        if groups.pp_rank == stage:
            held = _gathered_partitions(local[name]) if zero3 and name in parameters else local[name].detach()
            if hasattr(local[name], "expert_range") and groups.dp_rank < groups.expert:  # rank 0's expert group
                held = _gathered_experts(local[name].detach(), groups.ep_group)  # (no ZeRO-3 with experts)
        if groups.dp_rank != 0:
            return None
        if groups.pp_rank == stage:
            assert held is not None  # data-parallel rank 0 gathered it
            full = merge_tensor(model, name, held, groups.tp_group)
            if stage == 0 or groups.tp_rank != 0:
                return full if dist.get_rank() == 0 else None
            dist.send(full, dst=groups.pp_ranks[0])
        elif groups.pp_rank == 0 and groups.tp_rank == 0:
            full = torch.empty(spec[name][0], dtype=spec[name][1], device=comm_device())
            dist.recv(full, src=source)
            return full
        return None

    return hf_files.shard_plan(spec, max_shard_size), tensor_of


def _gathered_experts(held: torch.Tensor, ep_group) -> torch.Tensor:
    """The tensor of every expert from the expert-parallel ranks' blocks, in rank order (collective)."""
    blocks = [torch.empty_like(held) for _ in range(dist.get_world_size(ep_group))]
    dist.all_gather(blocks, held.contiguous(), group=ep_group)
    return torch.cat(blocks)


def _gathered_partitions(param) -> torch.Tensor | None:
    """This rank's full (tensor-parallel) piece of a ZeRO-3 parameter on data-parallel rank 0 (collective over
    the parameter's data-parallel group)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone() if dist.get_rank(param.ds_process_group) == 0 else None


def check_export_dir(out_dir: Path) -> None:
    """Before training: the end-of-run export will be allowed to write ``out_dir`` (see ``export_hf``)."""
    files.check_export_target(out_dir, fix=_EXPORT_FIX)


_EXPORT_FIX = ("move what it holds elsewhere (train.export_hf always writes to output_dir/hf; or set "
               "train.export_hf=false and export later with `python -m training.checkpoint.export OUTPUT_DIR NEW_DIR`)")
