"""Regressions from the new-user trial (issue 12): a changed LR on resume, evaluation independent of the
data-parallel size, the console lines a user needs, W&B's record of the layout, and CLI errors without
tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dist import run_ranks
from tests.helpers import reference_lr_multiplier, tiny_config, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def _train(cfgs):
    """Rank function: train each config in turn; per run its step records."""
    from training import run

    return [[r for r in run(cfg).history if "loss" in r] for cfg in cfgs]


def _expected_lr(peak: float, step_index: int, warmup: int, steps: int, floor: float) -> float:
    """The reference schedule (``tests/helpers.reference_lr_multiplier``, written independently of
    training/engine.py) at ``peak``."""
    from types import SimpleNamespace

    return peak * reference_lr_multiplier(SimpleNamespace(warmup_steps=warmup, min_lr_ratio=floor), step_index, steps)


@pytest.mark.multiprocess
def test_changed_lr_on_resume_takes_effect_and_is_announced(tmp_path, capfd):
    """Before: the schedule came back from the checkpoint with the old peak lr while config.yaml recorded the new
    one. Now the schedule's position comes from the checkpoint and its shape from the new config."""
    corpus = write_corpus(tmp_path / "corpus")
    first = tiny_config(tmp_path, corpus, train__steps=4, train__export_hf=True)  # lr 3e-3, warm-up 2
    second = tiny_config(tmp_path, corpus, train__steps=8, train__resume="auto", train__export_hf=True,
                         optim__lr=1e-3)
    before, after = run_ranks(_train, 1, [first, second], timeout=300)[0]
    console = capfd.readouterr()
    assert [r["lr"] for r in before] == pytest.approx([_expected_lr(3e-3, s, 2, 4, 0.1) for s in range(4)], rel=1e-9)
    assert [r["step"] for r in after] == [5, 6, 7, 8]
    assert [r["lr"] for r in after] == pytest.approx([_expected_lr(1e-3, s, 2, 8, 0.1) for s in range(4, 8)],
                                                     rel=1e-9)
    run_dir = tmp_path / "run"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 1e-3
    text = console.out + console.err
    assert f"resuming from {run_dir / 'checkpoints' / 'step_0000004'}: step 4, 8 samples consumed" in text
    assert "changed since that checkpoint, in effect from step 5" in text
    assert "optim.lr: 0.003 -> 0.001" in text and "train.steps: 4 -> 8" in text
    checkpoint = run_dir / "checkpoints" / "step_0000008"
    assert (f"done: 8 steps; metrics {run_dir / 'metrics.jsonl'}; checkpoint {checkpoint}; "
            f"Hugging Face export {run_dir / 'hf'}") in text
    assert "model: gpt2, 2 layers, hidden size 32" in text
    assert "layout: world 1 = tensor 1 x pipeline 1 x data 1" in text


def _eval_at_step_0(cfg):
    from training import run

    return [r for r in run(cfg).history if "perplexity" in r][0]["perplexity"]


@pytest.mark.multiprocess
def test_eval_scores_the_same_blocks_at_every_data_parallel_size(tmp_path):
    """train.eval_batches=3 micro-batches of 2: the first 6 validation blocks, at DP=1 and at DP=2 (before: 3
    rounds of micro x dp blocks, so 6 blocks at DP=1 and 12 at DP=2, and a different perplexity)."""
    corpus = write_corpus(tmp_path / "corpus")
    cfg = {name: tiny_config(tmp_path / name, corpus, train__steps=1, train__eval_first=True, train__eval_batches=3,
                             train__save_final=False, parallel__zero_stage=1, optim__warmup_steps=1)
           for name in ("dp1", "dp2")}
    dp1 = run_ranks(_eval_at_step_0, 1, cfg["dp1"], timeout=300)[0]
    dp2 = run_ranks(_eval_at_step_0, 2, cfg["dp2"], timeout=300)
    # The same initial weights and the same 6 blocks; only the order of the fp64 sums differs.
    assert dp2[0] == dp2[1] == pytest.approx(dp1, rel=1e-6)


@pytest.mark.unit
def test_eval_rounds_cover_the_first_examples_whatever_the_layout():
    from training.data import eval_rounds

    for limit, expected in ((None, set(range(7))), (2, set(range(4))), (9, set(range(7)))):
        for dp in (1, 2, 3):
            rounds = [list(eval_rounds(7, 2, r, dp, limit)) for r in range(dp)]
            assert len({len(per_rank) for per_rank in rounds}) == 1  # every rank runs the same rounds
            scored = [p for per_rank in rounds for positions, real in per_rank for p, ok in zip(positions, real) if ok]
            assert sorted(scored) == sorted(expected), (limit, dp)


def _wandb_layout(cfg):
    """Rank function: train with W&B offline and return the config W&B was given."""
    import wandb

    seen = {}
    original = wandb.init

    def recording_init(**kwargs):
        seen.update(kwargs["config"])
        return original(**kwargs)

    wandb.init = recording_init
    from training import run

    run(cfg)
    return seen.get("layout")


@pytest.mark.multiprocess
def test_wandb_records_the_layout(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path, corpus, train__steps=1, train__save_final=False, parallel__zero_stage=1,
                      optim__warmup_steps=0, logging__wandb={"mode": "offline"})
    layout = run_ranks(_wandb_layout, 2, cfg, timeout=300)[0]
    assert layout == {"world_size": 2, "tensor": 1, "pipeline": 1, "data": 2}


@pytest.mark.subprocess
def test_bench_schedule_rejects_impossible_shapes_in_one_line():
    """Before: a ValueError traceback for an interleaved schedule whose micro-batches the stages do not divide."""
    for args in (["--schedule", "interleaved", "-p", "4", "-m", "3", "-v", "2"], ["-p", "0"]):
        out = subprocess.run([sys.executable, "-m", "bench", "schedule", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "interleaved schedule needs micro-batches (3) divisible by pipeline stages (4)" in \
        subprocess.run([sys.executable, "-m", "bench", "schedule", "--schedule", "interleaved", "-p", "4", "-m", "3",
                        "-v", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60).stderr
