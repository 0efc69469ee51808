"""Step metrics: reductions over the data-parallel group, tokens/s, and the sinks (JSONL, W&B, tqdm)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallel.comm import comm_device


def sum_over(group, *values: float | torch.Tensor) -> list[float]:
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


class MetricsSink:
    """Rank 0 writes ``metrics.jsonl`` (one object per record) and mirrors records to W&B; other ranks
    write nothing. W&B mode 'disabled' never imports wandb. A resumed run (``resume_after_step``) keeps the
    records up to that step and drops the later ones a crashed run may have written."""

    def __init__(self, output_dir: str | Path, is_writer: bool, wandb_cfg, run_config: dict[str, Any],
                 resume_after_step: int | None = None):
        self.is_writer = is_writer
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        self._wandb = None
        if not is_writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_after_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_after_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)  # a crash here leaves the old file or the trimmed one, never a cut one
        self._file = self.path.open("a" if resume_after_step is not None else "w")
        if wandb_cfg.mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name, group=wandb_cfg.group,
                                     mode=wandb_cfg.mode, dir=str(output_dir), config=run_config)

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_writer:
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
