"""Run a function on N local ranks (processes, gloo), with a hard timeout.

A failing rank's traceback is re-raised in the test with its rank id; a rank that hangs fails the test
after ``timeout`` seconds and every rank is killed, so a deadlock can never stall the suite.

Without CUDA the ranks are forked from a fork server that imported torch, DeepSpeed, transformers, datasets
and colonnade once for the whole session (``tests/rank_preload.py``): a spawned rank spent about 4 s on those
imports, 8 s of wall time per launch of 4 ranks on the 2-core box, more than most tests' training. The server
runs no test code, so every rank starts from the same untouched modules, with the environment and the
stdout/stderr the test has when it launches them, as a spawned rank does. With CUDA (a fork after CUDA is
initialised breaks it) or ``COLONNADE_TEST_SPAWN=1`` the ranks are spawned. What differs from spawned ranks:
a variable a library reads when it is imported (``datasets.config``, ``huggingface_hub.constants``, DeepSpeed's
accelerator) keeps the value the server saw, so a test that sets one before launching ranks must spawn; the
server holds a few native threads (torch's, pyarrow's jemalloc background thread) whose libraries keep fork
handlers; a rank that dies before ``_entry`` runs writes its traceback to the console of the test that started
the server, and the test sees only its exit code.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from multiprocessing import reduction


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _context():
    import torch

    if os.environ.get("COLONNADE_TEST_SPAWN") == "1" or torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.rank_preload"])
    return ctx


class _Fd:
    """The test's stdout or stderr, handed to a forked rank (a spawned one inherits them): pytest's capture
    (``capfd``) and the console see what the ranks print."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _own_fd, (reduction.DupFd(self.fd),)


def _own_fd(dup) -> int:
    return dup.detach()


def _entry(fn, rank, world_size, port, results, env, outputs, args, kwargs):
    if outputs is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        for target, fd in zip((1, 2), outputs):
            os.dup2(fd, target)
            os.close(fd)
    os.environ.clear()
    os.environ.update(env)  # the test's environment when it launched the ranks, as a spawned rank has it
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
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    outputs = (_Fd(1), _Fd(2)) if ctx.get_start_method() == "forkserver" else None
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, results, env, outputs, args, kwargs),
                         daemon=True)
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
                    code = procs[dead[0]].exitcode
                    raise RuntimeError(f"rank {dead[0]} died with exit code {code}") from None
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
