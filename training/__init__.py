"""The trainer: typed config, DeepSpeed engine, data, step loop, checkpoints and metrics."""

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.config import RunConfig

if "DS_ACCELERATOR" not in os.environ:  # DeepSpeed would warn on every rank that it fell back to the CPU
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def run(cfg: "RunConfig", deepspeed_config_file: str | None = None, **kwargs: Any) -> Any:
    """Train according to ``cfg`` (see :func:`training.loop.run`: ``observers``, ``edit_model_config``)."""
    from training.loop import run as _run

    return _run(cfg, deepspeed_config_file, **kwargs)
