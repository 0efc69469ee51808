"""Step metrics: reductions over the data-parallel group, tokens/s, and the sinks (JSONL, W&B, tqdm)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def mean_over(group, value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, group=group)
    return float(tensor.item()) / dist.get_world_size(group)


def sum_over(group, *values: float) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def perplexity(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")


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
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_after_step]
        self._file = self.path.open("w")
        self._file.writelines(line + "\n" for line in kept)
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
