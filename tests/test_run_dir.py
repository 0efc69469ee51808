"""train.output_dir: a start writes only into a new or empty directory or a colonnade run (its marker), never
loses a run's metrics without being asked, and an empty value is refused (issue 30 point 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY_GPT2, write_corpus
from training import run_dir

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.unit
def test_the_rule_on_directories(tmp_path):
    assert run_dir.check(str(tmp_path / "new"), None, False) is False
    (tmp_path / "empty").mkdir()
    assert run_dir.check(str(tmp_path / "empty"), None, False) is False
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("mine\n")
    for resume, overwrite in ((None, False), ("auto", False), (None, True)):
        with pytest.raises(run_dir.RunDirError, match=r"holds config.yaml and is not a colonnade run"):
            run_dir.check(str(mine), resume, overwrite)
    (tmp_path / "file").write_text("x")
    with pytest.raises(run_dir.RunDirError, match="exists and is not a directory"):
        run_dir.check(str(tmp_path / "file"), None, False)

    legacy = tmp_path / "legacy"  # a run of a colonnade from before the marker: recognised by its checkpoints
    (legacy / "checkpoints" / "step_0000004").mkdir(parents=True)
    assert run_dir.is_run(legacy) and run_dir.check(str(legacy), "auto", False) is True  # nothing complete
    with pytest.raises(run_dir.RunDirError, match="already holds checkpoints of a run: set train.resume=auto"):
        run_dir.check(str(legacy), None, False)

    run = tmp_path / "run"
    assert run_dir.claim(str(run)) is None and run_dir.is_run(run)
    assert run_dir.check(str(run), None, False) is False  # ours, nothing of a run in it yet
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(run_dir.RunDirError, match=r"already holds a run \(metrics.jsonl, no checkpoint"):
        run_dir.check(str(run), None, False)
    assert run_dir.check(str(run), "auto", False) is True  # nothing to continue: starts over, moving them
    assert run_dir.check(str(run), None, True) is True
    (run / "notes.txt").write_text("the user's\n")
    moved = run_dir.claim(str(run), start_over=True)
    assert moved == run / "earlier" / "1" and (moved / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (run / "notes.txt").read_text() == "the user's\n" and not (run / "metrics.jsonl").exists()
    (run / "metrics.jsonl").write_text('{"step": 2}\n')
    assert run_dir.claim(str(run), start_over=True) == run / "earlier" / "2"


def _train(cwd: Path, config: Path, *sets: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_SILENT="true", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    argv = [sys.executable, str(ROOT / "train.py"), "--config", str(config)]
    for item in sets:
        argv += ["--set", item]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.subprocess
def test_train_py_never_overwrites_what_is_not_a_run_nor_a_run_silently(tmp_path):
    """Before: the foreign directory's config.yaml and metrics.jsonl were replaced (exit 0); an empty output_dir
    wrote config.yaml, deepspeed.json, metrics.jsonl and tokenizer/ into the current directory; a second start
    of a save_final=false run replaced its metrics.jsonl."""
    corpus = write_corpus(tmp_path / "corpus", n_files=2, words=600)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"arch": "gpt2", "tokenizer": "byte", "config": TINY_GPT2},
        "data": {"train_files": [str(corpus / "part0.txt")], "seq_len": 32},
        "train": {"steps": 2, "micro_batch_size": 2, "progress": False, "export_hf": False, "save_final": False,
                  "output_dir": "out"},
        "logging": {"wandb": {"mode": "disabled"}}}))
    foreign = tmp_path / "d"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("mine\n")
    (foreign / "metrics.jsonl").write_text("mine\n")
    before = _snapshot(foreign)
    refused = _train(tmp_path, config, f"train.output_dir={foreign}")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "is not a colonnade run (no colonnade_run.json); nothing was written" in refused.stderr
    assert _snapshot(foreign) == before

    cwd_before = sorted(p.name for p in tmp_path.iterdir())
    empty = _train(tmp_path, config, "train.output_dir=")
    assert empty.returncode == 2 and "train.output_dir='': the run needs a directory of its own" in empty.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == cwd_before

    first = _train(tmp_path, config)
    assert first.returncode == 0, first.stderr[-2000:]
    metrics = (tmp_path / "out" / "metrics.jsonl").read_text()
    again = _train(tmp_path, config)
    assert again.returncode == 2 and "already holds a run (metrics.jsonl, no checkpoint" in again.stderr
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == metrics
    over = _train(tmp_path, config, "train.overwrite=true")
    assert over.returncode == 0, over.stderr[-2000:]
    assert "were moved into out/earlier/1" in over.stdout + over.stderr
    assert (tmp_path / "out" / "earlier" / "1" / "metrics.jsonl").read_text() == metrics
    assert [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line] == [1, 2]
