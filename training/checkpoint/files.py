"""Crash-safe checkpoint directories on disk: atomic files, a SHA-256 manifest, and finding the newest
complete checkpoint. Knows nothing of models or ranks.

A checkpoint is written into a hidden staging directory (``.step_0000010.partial``); every file goes to a
temporary name, is flushed to disk and renamed; the manifest (file -> size and SHA-256) is written last;
then the staging directory is renamed to ``step_0000010`` and ``latest`` is rewritten to name it. A crash
at any point leaves either no ``step_*`` directory or a complete one: ``newest_complete`` only ever sees
directories with a manifest, and ``verify`` names any file whose bytes no longer match it.

``write_export`` writes a Hugging Face export directory the same way and never deletes what it did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

MANIFEST = "manifest.json"
FORMAT = "colonnade-checkpoint/2"  # one file per rank (``pieces``)
READABLE_FORMATS = (FORMAT, "colonnade-checkpoint/1")  # 1: the full state gathered into one file per kind
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


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
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


def describe_file(path: Path) -> dict[str, Any]:
    """A file's manifest entry: its size and SHA-256."""
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def commit(staging: Path, step: int, described: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write the manifest of every file of ``staging`` (``described``: entries their writers already made with
    ``describe_file``, e.g. each rank for its own file; the others are hashed here), rename the directory to
    its final name, then point ``latest`` at it. Returns the final directory."""
    described = described or {}
    files = sorted(p for p in staging.rglob("*") if p.is_file() and not p.name.startswith("."))
    for path in files:  # files written by other libraries (the tokenizer's) were not fsynced yet
        if str(path.relative_to(staging)) not in described:
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
    entries = {}
    for path in files:
        name = str(path.relative_to(staging))
        entry = described.get(name)
        if entry is None or entry["bytes"] != path.stat().st_size:
            entry = describe_file(path)
        entries[name] = entry
    manifest = {"format": FORMAT, "step": step, "files": entries}
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
    return max(done, key=lambda p: step_of(p) or 0) if done else None  # each has a step: is_complete


def read_manifest(path: Path) -> dict[str, Any]:
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}, so this checkpoint was never completed (the save was "
                              f"interrupted); resume from an earlier step_* directory or use train.resume=auto")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / MANIFEST}: not valid JSON ({exc}); the checkpoint is damaged") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected one of {READABLE_FORMATS} "
                              f"(a checkpoint written by another tool or another colonnade)")
    return manifest


def verify(path: Path, share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Check the files of the manifest before anything is loaded: every file's presence and size, and the
    SHA-256 of this caller's ``share`` (index, count) of them, so that the ranks of a job split the hashing
    (``(0, 1)``: all of them). The first damaged or missing file is named in the error. Returns the manifest."""
    manifest = read_manifest(path)
    index, count = share
    for position, (name, expected) in enumerate(manifest["files"].items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing; the checkpoint is incomplete")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint file {file} is {size} bytes, the manifest says {expected['bytes']} "
                                  f"(truncated or overwritten); restore it or resume from another checkpoint")
        if position % count == index and sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {file} does not match its SHA-256 in {MANIFEST} (corrupted); "
                                  f"restore it or resume from another checkpoint")
    return manifest


# ---------------------------------------------------------------------------------------------- export

EXPORT_MARKER = "colonnade_export.json"
EXPORT_FORMAT = "colonnade-export/1"
_RUN_NAMES = ("checkpoints", "metrics.jsonl", MANIFEST)  # a run's output_dir, its checkpoint root, a checkpoint


def write_export(out: str | Path, write: Callable[[Path], None], source: str | Path | None = None,
                 fix: str = "choose a new or empty directory") -> Path:
    """Write a Hugging Face export directory ``out`` without ever deleting what we did not write: the one rule
    for ``python -m training.checkpoint.export`` and the end-of-run export.

    ``out`` must be new, empty, or an earlier export of ours (it has ``EXPORT_MARKER`` and holds only the
    files it lists), which is then replaced; anything else is refused with a ``CheckpointError`` naming ``out``,
    why, and ``fix``, before ``write`` runs. ``out`` is never the checkpoint being exported (``source``), never
    inside a checkpoint and never holds one or a run. ``write(tmp)`` fills a fresh hidden temporary sibling made
    by ``mkdtemp`` (never a fixed name that could be someone's); the marker listing its files goes in last, the
    files are fsynced and the directory renamed into place (an earlier export is moved aside first, and
    removed only once the new one has its name). Returns ``out``."""
    given = Path(out)
    target = given.resolve()
    check_export_target(given, source, fix)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".export-partial", dir=target.parent))
    try:
        tmp.chmod(target.stat().st_mode & 0o7777 if target.is_dir() else _default_dir_mode(tmp))
        write(tmp)
        written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() or p.is_symlink())
        for name in written:
            if not (tmp / name).is_symlink():
                with open(tmp / name, "rb+") as handle:
                    os.fsync(handle.fileno())
        marker = {"format": EXPORT_FORMAT, "source": str(Path(source).resolve()) if source else None,
                  "files": written}
        write_text_atomic(tmp / EXPORT_MARKER, json.dumps(marker, indent=1))
        _fsync_dir(tmp)
        check_export_target(given, source, fix)  # again: the write may have taken hours
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # made by mkdtemp above: ours alone
        raise
    return given


def _install(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target`` (absent, empty, or an earlier export of ours, already checked)."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.rename(tmp, target)  # over an empty directory too; a directory filled meanwhile makes this fail
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".export-old", dir=target.parent))
        os.rename(target, old)  # onto the empty directory just made
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        _remove_export(old)
    _fsync_dir(target.parent)


def _remove_export(directory: Path) -> None:
    """Delete the files an earlier export's marker lists, then its directories if that empties them; anything
    that appeared there since it was checked stays (in the hidden ``.export-old`` sibling)."""
    listed = json.loads((directory / EXPORT_MARKER).read_text())["files"] + [EXPORT_MARKER]
    for name in listed:
        (directory / name).unlink(missing_ok=True)
    for name in sorted({str(p) for n in listed for p in Path(n).parents if str(p) != "."}, key=len, reverse=True):
        try:
            (directory / name).rmdir()
        except OSError:  # not empty: holds something that is not ours
            pass
    try:
        directory.rmdir()
    except OSError:
        pass


def _default_dir_mode(inside: Path) -> int:
    """The mode a new directory gets under this process's umask (``mkdtemp`` makes them 0700), read without
    changing the umask (which other threads share)."""
    probe = inside / ".mode"
    probe.mkdir()
    mode = probe.stat().st_mode & 0o777
    probe.rmdir()
    return mode


def check_export_target(out: str | Path, source: str | Path | None = None,
                        fix: str = "choose a new or empty directory") -> None:
    """``CheckpointError`` naming ``out``, why and ``fix`` unless ``write_export`` may write there."""
    why = _why_not_writable(Path(out).resolve(), Path(source).resolve() if source is not None else None)
    if why is not None:
        raise CheckpointError(f"{out}: not exported there, nothing was changed: {why}; the export directory must "
                              f"be new, empty, or an earlier export of ours: {fix}")


def _why_not_writable(target: Path, source: Path | None) -> str | None:
    if source is not None:
        if target == source:
            return "it is the checkpoint being exported"
        if source in target.parents:
            return f"it lies inside the checkpoint being exported ({source})"
        if target in source.parents:
            return f"it holds the checkpoint being exported ({source})"
    inside = next((p for p in target.parents if is_complete(p) or _is_staging(p)), None)
    if inside is not None:
        return f"it lies inside the checkpoint {inside}"
    if step_of(target) is not None or (target.parent.is_dir() and any(step_of(p) is not None
                                                                      for p in target.parent.iterdir())):
        return f"it would lie among the checkpoints of {target.parent}"
    if not target.exists() and not target.is_symlink():
        return None
    if not target.is_dir():
        return "it exists and is not a directory"
    run = _run_data(target)
    if run is not None:
        return f"it holds a training run's checkpoints or metrics ({run})"
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return None
    marker = target / EXPORT_MARKER
    if not marker.is_file():
        return f"it holds {_some(entries)} and is not an earlier export of ours (no {EXPORT_MARKER})"
    try:
        recorded = json.loads(marker.read_text())
        listed = {str(Path(name)) for name in recorded["files"]} | {EXPORT_MARKER}
        ours = recorded["format"] == EXPORT_FORMAT
    except Exception:  # not JSON, no file list: not ours to replace
        ours = False
    if not ours:
        return f"its {EXPORT_MARKER} is not one we wrote ({EXPORT_FORMAT} with a file list)"
    parents = {str(parent) for name in listed for parent in Path(name).parents}
    foreign = []
    for dirpath, dirnames, filenames in os.walk(target):
        for name in sorted(dirnames + filenames):
            rel = str((Path(dirpath) / name).relative_to(target))
            full = target / rel
            if (rel not in parents if full.is_dir() and not full.is_symlink() else rel not in listed):
                foreign.append(rel)
        dirnames[:] = [d for d in dirnames if str((Path(dirpath) / d).relative_to(target)) in parents]
    if foreign:
        return f"it holds {_some(foreign)}, which the earlier export did not write"
    return None


def _run_data(directory: Path, depth: int = 2) -> Path | None:
    """A sign of a run or checkpoint in ``directory`` or up to ``depth`` levels below it: a checkpoint root,
    ``metrics.jsonl``, a ``manifest.json``, a ``step_*`` directory."""
    try:
        children = sorted(directory.iterdir())
    except OSError:
        return None
    for child in children:
        if child.name in _RUN_NAMES or (step_of(child) is not None and child.is_dir()) or _is_staging(child):
            return child
    if depth > 0:
        for child in children:
            if child.is_dir() and not child.is_symlink():
                found = _run_data(child, depth - 1)
                if found is not None:
                    return found
    return None


def _is_staging(path: Path) -> bool:
    return path.name.startswith(".step_") and path.name.endswith(".partial")


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown if len(names) <= 3 else f"{shown} and {len(names) - 3} more"
