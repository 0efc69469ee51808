"""Crash-safe checkpoint directories on disk: atomic files, a SHA-256 manifest, and finding the newest
complete checkpoint. Knows nothing of models or ranks.

A checkpoint is written into a hidden staging directory (``.step_0000010.partial``); every file goes to a
temporary name, is flushed to disk and renamed; the manifest (file -> size and SHA-256) is written last;
then the staging directory is renamed to ``step_0000010`` and ``latest`` is rewritten to name it. A crash
at any point leaves either no ``step_*`` directory or a complete one: ``newest_complete`` only ever sees
directories with a manifest, and ``verify`` names any file whose bytes no longer match it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

MANIFEST = "manifest.json"
FORMAT = "colonnade-checkpoint/1"
_TAG = re.compile(r"^step_(\d{7,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the directory or file and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def step_of(path: Path) -> int | None:
    match = _TAG.match(path.name)
    return int(match.group(1)) if match else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``; it is fsynced, then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def staging_dir(root: Path, step: int) -> Path:
    return root / f".{tag_for(step)}.partial"


def begin(root: Path, step: int) -> Path:
    """A fresh, empty staging directory for the checkpoint of ``step`` (a stale one from a crash is removed)."""
    root.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(root, step)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def commit(staging: Path, step: int, extra: dict[str, Any] | None = None) -> Path:
    """Hash every file of ``staging`` into the manifest, rename the directory to its final name, then
    point ``latest`` at it. Returns the final directory."""
    files = sorted(p for p in staging.rglob("*") if p.is_file() and not p.name.startswith("."))
    for path in files:  # files written by other libraries (the tokenizer's) were not fsynced yet
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    manifest = {"format": FORMAT, "step": step, **(extra or {}),
                "files": {str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                          for p in files}}
    write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=1))
    _fsync_dir(staging)
    final = staging.parent / tag_for(step)
    replaced = staging.parent / f".{tag_for(step)}.replaced"
    if final.exists():  # an older save of the same step: moved aside whole, so a crash never leaves half of it
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staging, final)
    _fsync_dir(staging.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    write_text_atomic(staging.parent / "latest", final.name + "\n")
    return final


def is_complete(path: Path) -> bool:
    return step_of(path) is not None and (path / MANIFEST).is_file()


def newest_complete(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (staging directories and directories
    without a manifest are incomplete and skipped)."""
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return max(done, key=step_of) if done else None


def read_manifest(path: Path) -> dict[str, Any]:
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}, so this checkpoint was never completed (the save was "
                              f"interrupted); resume from an earlier step_* directory or use train.resume=auto")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / MANIFEST}: not valid JSON ({exc}); the checkpoint is damaged") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r} (a checkpoint "
                              f"written by another tool or an older colonnade)")
    return manifest


def verify(path: Path) -> dict[str, Any]:
    """Check every file of the manifest (size and SHA-256) before anything is loaded; the first damaged or
    missing file is named in the error. Returns the manifest."""
    manifest = read_manifest(path)
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing; the checkpoint is incomplete")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint file {file} is {size} bytes, the manifest says {expected['bytes']} "
                                  f"(truncated or overwritten); restore it or resume from another checkpoint")
        if sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {file} does not match its SHA-256 in {MANIFEST} (corrupted); "
                                  f"restore it or resume from another checkpoint")
    return manifest
