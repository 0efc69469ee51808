"""Elastic restarts under ``torchrun --nnodes MIN:MAX --max-restarts K`` (c10d rendezvous).

When a rank or a node dies, torchrun's agents on the surviving nodes stop their workers, form a new rendezvous
with the nodes that are left (at least MIN) and start the workers again, with ``TORCHELASTIC_RESTART_COUNT``
one higher. A restarted worker group is the same run: it resumes from the newest complete checkpoint in
``train.output_dir`` (``train.resume`` None is taken as 'auto'), rebuilds its process groups for the new world
size with the same tensor and pipeline degrees, and derives ``train.grad_accum`` from
``train.global_batch_size`` so the global batch, the data order and the LR schedule go on unchanged.

Policy for the work since the last save: it is lost and replayed. The restarted group starts from the newest
complete checkpoint; the steps after it are trained again on exactly the samples they had (the data position
is the checkpoint's sample count). ``metrics.jsonl`` and the sample-id log keep only the records up to that
checkpoint, so they describe the run the model went through.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist


def restart_count() -> int:
    """How often torchrun has restarted this job's workers (0: first start, or not under torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def resume_setting(resume: str | None) -> str | None:
    """``train.resume`` for this start: a restarted worker group continues its own run ('auto')."""
    return "auto" if resume is None and restart_count() > 0 else resume


def init_process_group(backend: str, timeout: timedelta | None) -> bool:
    """Under torchrun's shared rendezvous store (``TORCHELASTIC_USE_AGENT_STORE``), join the process group
    through a store prefixed by the restart attempt and return True; otherwise do nothing and return False.
    torch keeps one store server for all rounds of the rendezvous, so without the prefix a restarted worker
    group reads the previous attempt's keys (e.g. gloo's addresses of ranks that died) and cannot connect."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return False
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    server = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                           timeout=timeout or timedelta(minutes=30))
    store = dist.PrefixStore(f"colonnade/attempt_{restart_count()}", server)
    if timeout:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return True
