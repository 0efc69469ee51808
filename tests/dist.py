"""Run a function on N local ranks (spawned processes, gloo), with a hard timeout.

A failing rank's traceback is re-raised in the test with its rank id; a rank that hangs fails the test
after ``timeout`` seconds and every rank is killed, so a deadlock can never stall the suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(fn, rank, world_size, port, results, args, kwargs):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        results.put((rank, "ok", fn(*args, **kwargs)))
    except BaseException:  # reported to the parent with the rank id
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 600, **kwargs) -> list:
    """Call ``fn(*args, **kwargs)`` on ranks 0..world_size-1; return their results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, results, args, kwargs), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    outcome: dict[int, tuple[str, object]] = {}
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s (hang?)")
            try:
                rank, status, value = results.get(timeout=min(remaining, 5))
                outcome[rank] = (status, value)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in outcome]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [(r, v) for r, (s, v) in sorted(outcome.items()) if s == "error"]
    if errors:
        rank, tb = errors[0]
        raise RuntimeError(f"rank {rank} failed:\n{tb}")
    return [outcome[r][1] for r in range(world_size)]
