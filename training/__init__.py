"""The trainer: typed config, DeepSpeed engine, data, step loop, checkpoints and metrics."""


def run(cfg, deepspeed_config_file=None):
    """Train according to ``cfg`` (see :func:`training.loop.run`)."""
    from training.loop import run as _run

    return _run(cfg, deepspeed_config_file)
