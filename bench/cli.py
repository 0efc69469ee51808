"""Bad input to a bench command: one line naming the key, file or value and the fix, exit code 2 (as train.py
and argparse), before anything is launched."""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # the repository's bench/results, wherever the command runs


class BadInput(SystemExit):
    """``SystemExit`` with code 2 whose text is the message (``fail`` has already printed it)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def one_line(message: str) -> str:
    """A multi-line error (``ConfigError``'s list of problems) as one line: the lines joined by '; '."""
    parts = [line.strip().removeprefix("- ").strip() for line in str(message).splitlines()]
    head, *rest = [p for p in parts if p] or [""]
    if not rest:
        return head
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest)


def fail(prog: str, *messages: str) -> BadInput:
    """Print each message as one line ``prog: message`` on stderr and raise ``BadInput`` (exit code 2)."""
    lines = [f"{prog}: {one_line(message)}" for message in messages]
    print("\n".join(lines), file=sys.stderr, flush=True)
    raise BadInput("\n".join(lines))


def config_problem(config: str, sets: list[str], world: int) -> str | None:
    """What is wrong with the run ``config`` + ``sets`` at ``world`` processes, as train.py would find it before
    launching (the strict load with its cross-field checks, the degrees against the world size, the batch
    derived for it), in one line; None when nothing is."""
    from training.config import ConfigError, data_parallel_size, for_world, load

    try:
        cfg = load(config, sets)
        data_parallel_size(cfg, world)
        for_world(cfg, world)
    except (ConfigError, OSError, ValueError) as exc:
        return one_line(str(exc))
    return None


def check_config(prog: str, config: str, sets: list[str], world: int) -> None:
    """``config_problem`` as a ``fail``."""
    problem = config_problem(config, sets, world)
    if problem:
        fail(prog, problem)
