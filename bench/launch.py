"""The bench commands' worker launch: ``python -m <module> ...`` as ``nproc`` processes under torchrun."""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path


def torchrun(module: str, nproc: int, args: list[str], *, sets: list[str] = (), port: int | None = None,
             threads: int | None = None, timeout: float | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``module``'s worker on ``nproc`` processes and wait: ``args``, then each of ``sets`` as ``--set``;
    ``threads`` per process (default: the cores shared out); W&B and datasets' progress bars quiet. Raises
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc)]
    cmd += ["--master_port", str(port)] if port is not None else []
    cmd += ["-m", module, *args, *[x for item in sets for x in ("--set", item)]]
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_SILENT="true",
                       HF_DATASETS_DISABLE_PROGRESS_BARS="1", **(env or {}))
    return subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=timeout)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden flags a command passes to its own workers: ``--worker`` and where to write (``--out-file``)."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-file", help=argparse.SUPPRESS)


def ran_as_worker(args, worker) -> bool:
    """In one of the command's torchrun workers (``--worker``): run ``worker(args)``, then end the process
    (``training.lifecycle.finish_process``; it does not return). Elsewhere: False."""
    if not args.worker:
        return False
    worker(args)
    from training.lifecycle import finish_process

    finish_process()
    return True


def first_error(log: str) -> str:
    """The worker's own exception (not torchrun's summary of it) as one line, with its reason: a config error
    lists its problems on the lines after the first."""
    from bench.cli import one_line

    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line.strip()) for line in log.splitlines()]
    start = next((i for i, line in enumerate(lines)
                  if re.match(r"^[\w.]*(Error|Exception|Timeout)\b.*:", line) and "ChildFailedError" not in line), None)
    if start is None:
        return log.strip().splitlines()[-1] if log.strip() else "failed without output"
    reason = list(itertools.takewhile(lambda line: line.startswith("- "), lines[start + 1:]))
    return one_line("\n".join([lines[start], *reason]))
