"""The HF export never deletes what it did not write: `python -m training.checkpoint.export CKPT OUT` and the end-of-run
export to output_dir/hf refuse a non-empty OUT that is not an earlier export of ours, and any OUT that is, holds
or lies inside the source checkpoint or a run; a user's directory named like a temporary sibling is left alone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist import run_ranks
from tests.helpers import tiny_config, write_corpus
from training.checkpoint import files
from training.checkpoint.export import main as export_main
from training.run_dir import claim as claim_run_dir

ROOT = Path(__file__).resolve().parents[1]


def _two_runs(good, refused):
    """Rank function: train ``good`` (checkpoints at steps 1 and 2, end-of-run export to its hf/); then start
    ``refused``, whose hf/ already holds a user's file, twice: as it is (refused before training) and with the
    start-of-run check switched off (as if the file appeared during training: the export itself refuses).
    Returns the two errors."""
    import training.checkpoint as checkpoint
    from training import run

    run(good)
    errors = []
    for check in (checkpoint.check_export_dir, lambda out_dir: None):
        checkpoint.check_export_dir = check
        try:
            run(refused)
            errors.append(None)
        except Exception as exc:  # expected: the export to hf/ is refused
            errors.append(f"{type(exc).__name__}: {exc}")
    return errors


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One tiny GPT-2 run made once; tests copy it before doing anything that could damage it."""
    base = tmp_path_factory.mktemp("export")
    corpus = write_corpus(base / "corpus", words=400)
    good = tiny_config(base / "good", corpus, train__steps=2, train__save_every=1, train__export_hf=True,
                       train__eval_batches=1)
    refused = tiny_config(base / "refused", corpus, train__steps=1, optim__warmup_steps=0, train__export_hf=True,
                          train__eval_batches=1)
    user_file = base / "refused" / "run" / "hf" / "notes.txt"
    claim_run_dir(str(user_file.parent.parent))  # a run of ours (else refused as someone else's directory) ...
    user_file.parent.mkdir(parents=True)  # ... whose hf/ holds a user's file
    user_file.write_text("mine")
    [(start_error, end_error)] = run_ranks(_two_runs, 1, good, refused, timeout=300)
    return {"run": base / "good" / "run", "start_error": start_error, "end_of_run_error": end_error,
            "user_file": user_file}


@pytest.fixture
def run_dir(made, tmp_path):
    """A private copy of the run: runs/good."""
    copy = tmp_path / "runs" / "good"
    shutil.copytree(made["run"], copy)
    return copy


def _snapshot(path: Path) -> dict[str, str]:
    """Every file, link and directory under ``path`` with its contents' hash: equal snapshots, same tree."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(path))
            if full.is_symlink():
                found[rel] = "link:" + os.readlink(full)
            elif full.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(full.read_bytes()).hexdigest()
    return found


def _export(capsys, *args) -> tuple[int, str]:
    code = export_main([str(a) for a in args])
    return code, capsys.readouterr().err


def _refused(code: int, err: str, out: Path, *why: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("colonnade export: error:"), err
    assert str(out) in lines[0], err
    for text in why:
        assert text in lines[0], err


@pytest.mark.multiprocess
def test_refuses_an_out_holding_someone_elses_file(run_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not yours")
    before, siblings = _snapshot(out), sorted(os.listdir(tmp_path))
    code, err = _export(capsys, run_dir, out)
    _refused(code, err, out, "empty")
    assert _snapshot(out) == before and (out / "notes.txt").read_text() == "not yours"
    assert sorted(os.listdir(tmp_path)) == siblings  # no temporary directory left behind


@pytest.mark.subprocess
def test_refuses_to_export_a_run_into_itself(run_dir):
    """As a subprocess, for the exit code of `python -m training.checkpoint.export RUN RUN`."""
    before = _snapshot(run_dir)
    assert any(name.startswith("checkpoints/step_") for name in before) and "metrics.jsonl" in before
    proc = subprocess.run([sys.executable, "-m", "training.checkpoint.export", str(run_dir), str(run_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(run_dir) in proc.stderr and "checkpoint" in proc.stderr, proc.stderr
    assert _snapshot(run_dir) == before
    assert sorted(os.listdir(run_dir.parent)) == ["good"]


@pytest.mark.multiprocess
def test_refuses_the_directory_holding_the_runs_and_another_run(run_dir, capsys):
    runs = run_dir.parent
    (runs / "other").mkdir()
    (runs / "other" / "metrics.jsonl").write_text("{}\n")  # a run that is not the source
    before, siblings = _snapshot(runs), sorted(os.listdir(runs.parent))
    code, err = _export(capsys, run_dir, runs)
    _refused(code, err, runs, "checkpoint")
    code, err = _export(capsys, run_dir, runs / "other")
    _refused(code, err, runs / "other", "training run", "metrics.jsonl")
    assert _snapshot(runs) == before
    assert sorted(os.listdir(runs.parent)) == siblings


@pytest.mark.multiprocess
@pytest.mark.parametrize("where", ["the checkpoint", "inside the checkpoint", "the checkpoints root"])
def test_refuses_the_checkpoint_and_what_is_inside_it(run_dir, capsys, where):
    checkpoint = run_dir / "checkpoints" / "step_0000002"
    out = {"the checkpoint": checkpoint, "inside the checkpoint": checkpoint / "hf",
           "the checkpoints root": run_dir / "checkpoints"}[where]
    before = _snapshot(run_dir)
    code, err = _export(capsys, checkpoint, out)
    _refused(code, err, out, "checkpoint")
    assert _snapshot(run_dir) == before
    assert files.verify(checkpoint)["step"] == 2


@pytest.mark.multiprocess
def test_new_out_then_again_replaces_it_and_a_user_tmp_dir_is_left_alone(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    user_tmp = tmp_path / "exported.tmp"  # the name the old export wrote to (and rmtree'd) first
    user_tmp.mkdir()
    (user_tmp / "thesis.tex").write_text("years of work")
    user_before = _snapshot(user_tmp)

    code, err = _export(capsys, run_dir / "checkpoints" / "step_0000001", out)
    assert code == 0, err
    assert AutoModelForCausalLM.from_pretrained(out) is not None and AutoTokenizer.from_pretrained(out) is not None
    step1 = _checkpoint_weights(run_dir / "checkpoints" / "step_0000001")
    assert load_file(out / "model.safetensors").keys() <= step1.keys()

    code, err = _export(capsys, run_dir, out)  # again, to the same OUT: the newest checkpoint replaces it
    assert code == 0, err
    exported, step2 = load_file(out / "model.safetensors"), _checkpoint_weights(run_dir / "checkpoints" /
                                                                                 "step_0000002")
    assert all((exported[k] == step2[k]).all() for k in exported)
    assert any(not (exported[k] == step1[k]).all() for k in exported)
    AutoModelForCausalLM.from_pretrained(out)

    assert _snapshot(user_tmp) == user_before
    assert sorted(os.listdir(tmp_path)) == ["exported", "exported.tmp", "runs"]  # nothing temporary left


@pytest.mark.multiprocess
def test_an_empty_out_is_filled(run_dir, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    code, err = _export(capsys, run_dir, out)
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


@pytest.mark.multiprocess
def test_an_earlier_export_with_a_file_added_is_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert _export(capsys, run_dir, out)[0] == 0
    (out / "README.md").write_text("my notes on this model")
    before = _snapshot(out)
    code, err = _export(capsys, run_dir, out)
    _refused(code, err, out, "README.md")
    assert _snapshot(out) == before


@pytest.mark.multiprocess
def test_end_of_run_export_follows_the_same_rule(made, run_dir, capsys):
    from transformers import AutoModelForCausalLM

    # It refused the hf/ holding a user's file, naming it, and left the file there: before training (nothing
    # else written) and, with that check off, at the export itself after training (the checkpoint was written).
    for error in (made["start_error"], made["end_of_run_error"]):
        assert error is not None and "CheckpointError" in error, error
        assert str(made["user_file"].parent) in error and "notes.txt" in error, error
    assert (made["user_file"].parents[1] / "checkpoints" / "step_0000001" / files.MANIFEST).is_file()
    assert made["user_file"].read_text() == "mine"
    assert sorted(os.listdir(made["user_file"].parent)) == ["notes.txt"]
    # A run's own export is an export of ours: the CLI may replace it, and it loads.
    AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    code, err = _export(capsys, run_dir, run_dir / "hf")
    assert code == 0, err
    AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    listed = json.loads((run_dir / "hf" / files.EXPORT_MARKER).read_text())["files"]
    assert "model.safetensors" in listed


@pytest.mark.multiprocess
def test_a_new_directory_among_checkpoints_is_refused(run_dir, capsys):
    """A new OUT named like a checkpoint, or beside them, would be taken for one (or block a later save)."""
    before = _snapshot(run_dir)
    for out in (run_dir / "checkpoints" / "step_0000400", run_dir / "checkpoints" / "exported"):
        code, err = _export(capsys, run_dir, out)
        _refused(code, err, out, "among the checkpoints")
    assert _snapshot(run_dir) == before


@pytest.mark.unit
def test_replacing_an_export_keeps_what_appeared_in_it_meanwhile(tmp_path):
    """The earlier export moved aside is emptied by its marker's list only: a file that appeared after the check
    survives (in the hidden sibling), it is never deleted."""
    old = tmp_path / "old"
    (old / "sub").mkdir(parents=True)
    (old / "model.safetensors").write_text("weights")
    (old / "sub" / "a.json").write_text("{}")
    (old / files.EXPORT_MARKER).write_text(json.dumps({"format": files.EXPORT_FORMAT,
                                                       "files": ["model.safetensors", "sub/a.json"]}))
    (old / "sub" / "late.txt").write_text("a user's")
    files._remove_export(old)
    assert (old / "sub" / "late.txt").read_text() == "a user's"
    assert not (old / "model.safetensors").exists() and not (old / files.EXPORT_MARKER).exists()


def _checkpoint_weights(path):
    from training.checkpoint.pieces import CheckpointReader

    reader = CheckpointReader(path)
    return {name: reader.full(f"model/{name}") for name in reader.names("model")}
