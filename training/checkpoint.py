"""DeepSpeed checkpoints (save every N steps, resume) and the final Hugging Face export."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from modeling.parallelize import full_state_dict as merge_tensor_parallel


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def save(engine, output_dir: str | Path, step: int, client_state: dict[str, Any]) -> Path:
    """Collective: every rank writes its shard. DeepSpeed updates ``latest`` only after all files are
    written, so an interrupted save leaves the previous checkpoint as the one resumed from."""
    root = checkpoint_root(output_dir)
    state = dict(client_state, step=step, torch_rng=torch.get_rng_state())
    engine.save_checkpoint(str(root), tag=tag_for(step), client_state=state)
    return root / tag_for(step)


def resolve_resume(resume: str | None, output_dir: str | Path) -> tuple[Path, str] | None:
    """``train.resume`` -> (load_dir, tag), or None to start fresh. 'auto' resumes the latest checkpoint
    in ``output_dir`` if there is one."""
    if resume is None:
        return None
    if resume == "auto":
        root = checkpoint_root(output_dir)
        latest = root / "latest"
        return (root, latest.read_text().strip()) if latest.is_file() else None
    path = Path(resume)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if path.is_dir():
        return path.parent, path.name
    raise FileNotFoundError(f"train.resume={resume}: no such checkpoint directory; use 'auto' or a path "
                            f"like {checkpoint_root(output_dir) / tag_for(100)}")


def load(engine, load_dir: Path, tag: str) -> dict[str, Any]:
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"train.resume: DeepSpeed found no checkpoint {tag} in {load_dir}")
    torch.set_rng_state(client_state["torch_rng"])
    return client_state


def full_state_dict(engine, model, groups) -> dict[str, torch.Tensor] | None:
    """The unsharded model weights on global rank 0 (None elsewhere): ZeRO-3 partitions gathered,
    tensor-parallel shards merged, pipeline stages collected. Collective over all ranks."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers params in their own dtype
        return state if dist.get_rank() == 0 else None
    if groups.pipeline == 1:
        state = merge_tensor_parallel(model, groups.tp_group)
        return state if dist.get_rank() == 0 else None
    full_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    mine = {full_names[id(p)]: p.detach() for p in engine.module.parameters()}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied twin under its other name
        if id(p) in {id(q) for q in engine.module.parameters()}:
            mine[name] = p.detach()
    merged = merge_tensor_parallel(model, groups.tp_group, mine)
    stages = [None] * groups.pipeline if groups.is_first_stage else None
    dist.gather_object(merged, stages, dst=groups.pp_ranks[0], group=groups.pp_group)
    if dist.get_rank() != 0:
        return None
    state = {name: tensor for stage in stages for name, tensor in stage.items()}
    param_names = set(full_names.values())
    missing = param_names - set(state)
    if missing:
        raise RuntimeError(f"pipeline export: no stage holds {sorted(missing)}")
    buffers = {k: v for k, v in model.state_dict().items() if k not in param_names}  # same on every stage
    return {**buffers, **state}


def export_hf(engine, model, tokenizer, out_dir: str | Path, groups) -> Path | None:
    """Write a ``from_pretrained``-loadable directory (safetensors + config + tokenizer), atomically."""
    out_dir = Path(out_dir)
    state = full_state_dict(engine, model, groups)
    if dist.get_rank() == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), state_dict={k: v.detach().cpu().contiguous()
                                                            for k, v in state.items()},
                                      safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    dist.barrier()
    return out_dir
