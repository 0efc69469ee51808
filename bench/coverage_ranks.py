"""The ranks of ``bench coverage``'s runs. Every run's ranks are forked from one server that imported torch,
DeepSpeed, transformers, colonnade and the covered models' modules once (``bench.coverage_preload``), so a run
of a tiny model costs its own work, not seconds of imports per rank (``tests/dist.py`` does the same for the test
suite). Each rank writes its console to the run's log and sends back one outcome: ``ok`` with the step records,
``refused`` with the one-line reason colonnade raised before it started building the model (its input checks),
or ``error`` with the traceback; a rank that sends nothing is ``lost``."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from training.events import Observer

LOGIT_SEED = 0  # the fixed batch the reference's and the export's logits are compared on
_SERVER: dict[str, Any] = {}


@dataclass
class Outcome:
    status: str  # ok, refused, error, lost
    value: Any  # ok: the rank's result dict; refused: the reason; error: the traceback; lost: what happened


class _Watch(Observer):
    """The run's phase (None until the model starts to be built: a ValueError before that is a refusal of the
    input) and every step's loss and gradient norm."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.steps: list[dict[str, float]] = []

    def on_phase_start(self, phase: str, step: int) -> None:
        self.phase = phase

    def on_phase_end(self, phase: str, step: int, record: dict[str, Any] | None) -> None:
        if phase == "step" and record is not None:
            self.steps.append({"step": step, "loss": float(record["loss"]),
                               "grad_norm": float(record["grad_norm"])})


def logit_batch(vocab: int, seq_len: int) -> Any:
    """Two fixed sequences of token ids under ``vocab``."""
    import torch

    return torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(LOGIT_SEED))


def train(job: dict[str, Any]) -> dict[str, Any]:
    """Rank function: train ``job["config"]`` (a config dict) with colonnade; the step records, or the refusal.
    With ``job["reference_file"]`` (one process) the trained model's weights and its logits on
    ``logit_batch`` are saved there. An error in the final export leaves the training's result standing."""
    from bench.cli import one_line
    from training import run
    from training.config import validate

    watch = _Watch()
    try:
        result = run(validate(job["config"]), observers=[watch])
    except (ValueError, OSError) as exc:  # as train.py: ConfigError is a ValueError; raised by the input checks
        if watch.phase is None:
            return {"status": "refused", "reason": one_line(str(exc))}
        raise
    except Exception:
        if watch.phase == "export":
            return {"status": "ok", "steps": watch.steps, "export_error": last_line(traceback.format_exc())}
        raise
    if job.get("reference_file"):
        _save_reference(result.model, job["reference_file"], job["config"]["data"]["seq_len"])
    return {"status": "ok", "steps": watch.steps}


def _save_reference(model: Any, path: str, seq_len: int) -> None:
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=logit_batch(model.config.vocab_size, seq_len), use_cache=False).logits
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    torch.save({"state": state, "logits": logits}, path)


def last_line(text: str) -> str:
    """A traceback's exception line (its last non-empty line), at most 300 characters."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "failed without output"
    return line if len(line) <= 300 else line[:297] + "..."


def start_server(modules: list[str]) -> None:
    """Choose how ranks start, once per process: forked from a server that imported ``bench.coverage_preload``
    and ``modules`` (the covered models' modeling modules); spawned where CUDA is initialised (a fork breaks it)
    or ``COLONNADE_TEST_SPAWN=1``."""
    if "context" in _SERVER:
        return
    import torch

    if os.environ.get("COLONNADE_TEST_SPAWN") == "1" or torch.cuda.is_available():
        _SERVER["context"] = mp.get_context("spawn")
        return
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["bench.coverage_preload", *modules])
    _SERVER["context"] = context


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(fn: Callable[[dict], Any], rank: int, world: int, port: int, results: Any, env: dict[str, str],
           log: str, job: dict[str, Any]) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WANDB_SILENT="true", OMP_NUM_THREADS="1",
                      TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    import torch

    torch.set_num_threads(1)  # tiny models: a second thread only waits (1 s for a 9 ms step on a busy 2-core box)
    try:
        result = fn(job)
        results.put((rank, "refused" if result.get("status") == "refused" else "ok",
                     result.get("reason") if result.get("status") == "refused" else result))
    except BaseException:  # reported to the parent with the rank id, and into the run's log
        traceback.print_exc()
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()


def launch(fn: Callable[[dict], Any], world: int, job: dict[str, Any], log: Path, timeout: float,
           grace: float = 20.0) -> list[Outcome]:
    """Run ``fn(job)`` on ranks 0..world-1 and wait: each rank's ``Outcome``. After the first error the others
    get ``grace`` seconds (a rank waiting in a collective for the failed one never returns); every rank still
    running at ``timeout`` or after the grace is killed and ``lost``."""
    start_server([])
    context = _SERVER["context"]
    results = context.Queue()
    env, port = dict(os.environ), _free_port()
    procs = [context.Process(target=_entry, args=(fn, rank, world, port, results, env, str(log), job), daemon=True)
             for rank in range(world)]
    for proc in procs:
        proc.start()
    outcomes: dict[int, Outcome] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                _collect_dead(procs, outcomes)
                continue
            outcomes[rank] = Outcome(status, value)
            if status == "error":
                deadline = min(deadline, time.monotonic() + grace)
    finally:
        _stop(procs, wait=5.0 if len(outcomes) == world else 0.0)
    _collect_dead(procs, outcomes)
    why = f"killed after {timeout:.0f}s" if not any(o.status == "error" for o in outcomes.values()) \
        else f"killed {grace:.0f}s after another rank's error"
    return [outcomes.get(rank, Outcome("lost", why)) for rank in range(world)]


def _collect_dead(procs: list[Any], outcomes: dict[int, Outcome]) -> None:
    """A rank that ended without an outcome (killed by the kernel, a native abort) is lost with its exit code."""
    for rank, proc in enumerate(procs):
        if rank not in outcomes and proc.exitcode not in (None, 0):
            outcomes[rank] = Outcome("lost", f"rank {rank} died with exit code {proc.exitcode}")


def _stop(procs: list[Any], wait: float) -> None:
    for proc in procs:
        proc.join(timeout=wait)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
