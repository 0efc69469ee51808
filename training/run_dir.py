"""The run directory (``train.output_dir``): what makes a directory a colonnade run, and when a start may write
into it. The export's rule (``checkpoint.files.write_export``) holds here too: a start writes only into a new or
empty directory or one that holds our marker, ``colonnade_run.json``, written before anything else; a directory
of someone else's is refused before anything is written, and nothing of a run is lost without the user asking."""

from __future__ import annotations

import json
from pathlib import Path

from training.checkpoint.files import newest_complete, step_of

RUN_MARKER = "colonnade_run.json"
RUN_FORMAT = "colonnade-run/1"
# What a start writes into its run directory; moved into ``earlier/N`` by train.overwrite.
RUN_FILES = ("config.yaml", "deepspeed.json", "metrics.jsonl", "tokenizer", "checkpoints", "samples", "hf")
EARLIER = "earlier"


class RunDirError(ValueError):
    """``train.output_dir`` may not be written as asked; the message says why and what to do."""


def is_run(directory: Path) -> bool:
    """Our marker, or (a run of a colonnade from before the marker) checkpoint directories of ours."""
    try:
        return json.loads((directory / RUN_MARKER).read_text()).get("format") == RUN_FORMAT
    except (OSError, ValueError, AttributeError):
        root = directory / "checkpoints"
        return root.is_dir() and any(step_of(p) is not None and p.is_dir() for p in root.iterdir())


def earlier_run_files(directory: Path) -> list[str]:
    return [name for name in RUN_FILES if (directory / name).exists()]


def check(output_dir: str, resume: str | None, overwrite: bool) -> bool:
    """Raise ``RunDirError`` unless this start may write into ``output_dir``; return whether it starts from step
    0 over an earlier run's files (``train.overwrite``, or ``train.resume=auto`` that found no checkpoint to
    continue), which ``claim`` then moves aside."""
    directory = Path(output_dir)
    key = f"train.output_dir={output_dir}"
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"{key} exists and is not a directory; choose a new or empty directory")
    entries = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    if not entries:
        return False
    if not is_run(directory):
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise RunDirError(f"{key} holds {shown} and is not a colonnade run (no {RUN_MARKER}); nothing was "
                          f"written: choose a new or empty directory")
    earlier = earlier_run_files(directory)
    if resume is not None or overwrite:
        return bool(earlier) and (overwrite or newest_complete(directory / "checkpoints") is None)
    again = (f"train.overwrite=true to start it again from step 0 (its files are moved into {output_dir}/"
             f"{EARLIER}/N, nothing is deleted), or choose a new train.output_dir")
    if (directory / "checkpoints").is_dir():
        raise RunDirError(f"{key} already holds checkpoints of a run: set train.resume=auto to continue it, {again}")
    if (directory / "metrics.jsonl").is_file():
        raise RunDirError(f"{key} already holds a run (metrics.jsonl, no checkpoint to continue from): set {again}")
    return False


def claim(output_dir: str, start_over: bool = False) -> Path | None:
    """Make ``output_dir`` ours (create it, write the marker) before writing anything into it; with
    ``start_over`` move the earlier run's files into ``earlier/N`` first and return where they went."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / RUN_MARKER).is_file():
        (directory / RUN_MARKER).write_text(json.dumps({"format": RUN_FORMAT}) + "\n")
    if not start_over or not earlier_run_files(directory):
        return None
    number = 1
    while (directory / EARLIER / str(number)).exists():
        number += 1
    destination = directory / EARLIER / str(number)
    destination.mkdir(parents=True)
    for name in earlier_run_files(directory):
        (directory / name).rename(destination / name)
    return destination
