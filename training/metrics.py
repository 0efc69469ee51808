"""Step metrics: reductions over the data-parallel group, tokens/s, and the sinks (JSONL, W&B, tqdm)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from parallel.comm import comm_device

if TYPE_CHECKING:
    from training.config_schema import WandbConfig


def sum_over(group: dist.ProcessGroup | None, *values: float | torch.Tensor) -> list[float]:
    """Each value summed over ``group``, read on the host once: floats, or 0-dim tensors still on the device
    (sums kept there through a loop, so the loop never waits for the device)."""
    device = comm_device(group)
    tensor = torch.stack([v.detach().to(device, torch.float64) if torch.is_tensor(v)
                          else torch.full((), v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def perplexity(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut by a crash (not valid JSON) counts as after every step."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def keep_until(path: Path, step: int) -> None:
    """Drop the records of ``path`` (JSON lines) after ``step``: those a crashed run wrote after the checkpoint
    a resumed run continues from."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)  # a crash here leaves the old file or the trimmed one, never a cut one


class SampleLog:
    """``train.log_sample_ids``: the ids of the training sequences of every step, one JSON line per step in
    ``output_dir/samples/rank-NNNNN.jsonl`` per data-parallel rank (written by its tensor-parallel rank 0 of the
    first pipeline stage). ``prepare`` (rank 0, before training) keeps what a resumed run continues from."""

    def __init__(self, output_dir: str | Path, dp_rank: int, is_writer: bool):
        self.directory = Path(output_dir) / "samples"
        self._file = None
        if is_writer:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = (self.directory / f"rank-{dp_rank:05d}.jsonl").open("a")

    @staticmethod
    def prepare(output_dir: str | Path, resume_after_step: int) -> None:
        for path in sorted((Path(output_dir) / "samples").glob("rank-*.jsonl")):
            keep_until(path, resume_after_step)

    def record(self, step: int, ids: list[int], attempt: int) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, "ids": ids, "attempt": attempt}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class MetricsSink:
    """Rank 0 writes ``metrics.jsonl`` (one object per record) and mirrors records to W&B; other ranks
    write nothing. W&B mode 'disabled' never imports wandb. A resumed run (``resume_after_step``) keeps the
    records up to that step and drops the later ones a crashed run may have written."""

    def __init__(self, output_dir: str | Path, is_writer: bool, wandb_cfg: WandbConfig, run_config: dict[str, Any],
                 resume_after_step: int | None = None):
        self.is_writer = is_writer
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        self._wandb = None
        if not is_writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after_step is not None:
            keep_until(self.path, resume_after_step)
        self._file = self.path.open("a" if resume_after_step is not None else "w")
        if wandb_cfg.mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name, group=wandb_cfg.group,
                                     mode=wandb_cfg.mode, dir=str(output_dir), config=run_config)

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:  # not the writer
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and not isinstance(v, str)},
                            step=record["step"])
            for key, value in record.items():
                if isinstance(value, str):  # e.g. the sacreBLEU signature: run summary, not a chart
                    self._wandb.summary[key] = value

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
