"""bench memory: per-phase peaks that reset between phases, and a tiny real run at TP=2."""

from __future__ import annotations

import json
import time

import torch

from bench.memory import PhasePeaks, main, parse_layout


def test_each_phase_sees_its_own_peak_not_an_earlier_one():
    peaks = PhasePeaks()
    peaks.start("load")
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, held for 20 samples of the 1 ms sampler
    time.sleep(0.02)
    del big
    peaks.start("steps")
    small = torch.ones(4 * 2**20 // 4)  # 4 MiB
    time.sleep(0.02)
    del small
    peaks.end()
    above = {phase: peak - peaks.runtime for phase, peak in peaks.peaks.items()}
    assert above["load"] >= 64 * 2**20
    # without the reset the steps phase would report the load phase's 64 MiB high-water mark
    assert above["steps"] < 32 * 2**20, above


def test_layout_strings():
    assert parse_layout("tensor=2,pipeline=2") == ("tensor=2,pipeline=2", ["parallel.tensor=2", "parallel.pipeline=2"], 4)
    assert parse_layout("data=2,zero=3") == ("data=2,zero=3", ["parallel.zero_stage=3"], 2)


def test_memory_benchmark_runs_every_phase(tmp_path):
    rows = main(["--config", "configs/sweeps/base_tiny.yaml", "--layout", "tensor=2", "--out", str(tmp_path)])
    (row,) = rows
    assert row["nproc"] == 2 and row["formula_bytes"] > 0
    for phase in ("load", "steps", "optimizer", "save", "export"):
        assert row[f"{phase}_above_runtime_bytes"] > 0, phase
    ranks = json.loads((tmp_path / "results.json").read_text())["ranks"][0]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert (tmp_path / "report.md").read_text().count("| tensor=2 | 2 |") == 1
