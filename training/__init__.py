"""The trainer: typed config, DeepSpeed engine, data, step loop, checkpoints and metrics."""

import os

if "DS_ACCELERATOR" not in os.environ:  # DeepSpeed would warn on every rank that it fell back to the CPU
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def run(cfg, deepspeed_config_file=None):
    """Train according to ``cfg`` (see :func:`training.loop.run`)."""
    from training.loop import run as _run

    return _run(cfg, deepspeed_config_file)
