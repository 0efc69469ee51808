"""Which checkpoint a run resumes from: ``train.resume`` resolved (and verified) on rank 0 and agreed by every
rank, a leftover checkpoint found, and the settings that changed since the run that wrote it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from parallel.comm import comm_device
from training.checkpoint import files
from training.checkpoint.files import CheckpointError, tag_for
from training.rank0 import on_every_rank, on_rank0


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def resolve_resume(resume: str | None, output_dir: str | Path, share: tuple[int, int] = (0, 1)) -> Path | None:
    """``train.resume`` -> the checkpoint directory to load, verified, or None to start fresh.
    'auto' takes the newest complete checkpoint in ``output_dir`` (incomplete saves are skipped); a path
    may be a checkpoint directory, or a ``checkpoints`` root / run directory (its newest complete one).
    ``share``: the part of the files' SHA-256 checks done here (``files.verify``)."""
    if resume is None:
        return None
    if resume == "auto":
        found = files.newest_complete(checkpoint_root(output_dir))
    else:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"train.resume={resume}: no such checkpoint directory; use 'auto' or a path "
                                    f"like {checkpoint_root(output_dir) / tag_for(100)}")
        found = path if files.step_of(path) is not None else (
            files.newest_complete(path) or files.newest_complete(checkpoint_root(path)))
        if found is None:
            raise CheckpointError(f"train.resume={resume}: no complete checkpoint (step_* directory with a "
                                  f"{files.MANIFEST}) there")
    if found is not None:
        files.verify(found, share)
    return found


def agree_on_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``resolve_resume`` on rank 0, the answer shared with every rank, and every rank checked to see it: a rank
    resuming while another starts fresh would hang the job later. The ranks split the files' SHA-256 checks."""
    share = (dist.get_rank(), dist.get_world_size())
    found = on_rank0(lambda: resolve_resume(resume, output_dir, share), "finding the checkpoint to resume from")
    shared = [str(found) if found is not None else None]
    dist.broadcast_object_list(shared, src=0)
    chosen = Path(shared[0]) if shared[0] is not None else None
    unseen = torch.tensor([0.0 if chosen is None or (chosen / files.MANIFEST).is_file() else 1.0],
                          device=comm_device())
    dist.all_reduce(unseen, op=dist.ReduceOp.MAX)
    if unseen.item():
        raise CheckpointError(f"train.resume: rank 0 resumes from {chosen}, which is not readable on every rank; "
                              f"train.output_dir (or the checkpoint path) must be on a filesystem all nodes share")
    if chosen is not None:
        on_every_rank(lambda: dist.get_rank() == 0 or files.verify(chosen, share), f"verifying {chosen}")
    return chosen


def existing_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoint_root(output_dir)
    return next((p for p in sorted(root.glob("step_*"))), None) if root.is_dir() else None


def changed_settings(path: Path, run_config: dict[str, Any]) -> list[str]:
    """'key: saved -> now' for every config value that differs from the run that wrote the checkpoint
    ``path`` (``train.resume`` aside)."""
    saved = _flatten(yaml.safe_load((path / "run_config.yaml").read_text()) or {})
    now = _flatten(run_config)
    keys = sorted((set(saved) | set(now)) - {"train.resume"})
    return [f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in keys if saved.get(key) != now.get(key)]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat
