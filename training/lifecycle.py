"""The process lifecycle of a launched job: join the process group the launcher describes, leave it, end the
process. Tests and bench import this without the trainer."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import warnings
from datetime import timedelta

import torch.distributed as dist

from parallel.flight import FlightRecorder
from training import elastic


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the process group the launcher describes (torchrun / deepspeed set RANK, WORLD_SIZE, ...);
    a plain ``python train.py`` becomes a world of one. gloo on CPU, NCCL on CUDA. A collective waiting
    longer than ``timeout_s`` raises instead of hanging."""
    if dist.is_initialized():
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    # torch 2.13 deprecates the names DeepSpeed's ZeRO and our TP layers call (renamed *_single; torch >= 2.4
    # must keep working): not the user's business.
    renamed = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    warnings.filterwarnings("ignore", category=FutureWarning, message=renamed)
    elastic.init_process_group(accel.communication_backend_name(), timeout.get("timeout"))
    # before DeepSpeed's backend binds the functions it calls (all_gather_into_tensor, ...): names the rank that
    # is behind when a collective times out, and counts the bytes each group sends
    FlightRecorder().install()
    with contextlib.redirect_stdout(io.StringIO()):  # "DeepSpeed ... shm_comm_op built successfully", per rank
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False,
                                   **timeout)


def shutdown_distributed() -> None:
    """Leave the process group once every rank is done; exiting with gloo's threads still running can abort
    a process ("terminate called without an active exception") after the work finished."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finish_process(code: int = 0) -> None:
    """End a launched process after its work is done and written: leave the process group, flush, and exit
    without the interpreter's shutdown, where native threads (gloo's, DeepSpeed's CPU communication op) can
    abort a finished process ("terminate called without an active exception") and fail a good run."""
    import sys

    if code == 0:
        shutdown_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
