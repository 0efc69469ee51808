"""bench compile: the report's arithmetic and bad input as one line (the timings are in bench/results)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_report_and_bad_input():
    from bench.compile import main as compile_main
    from bench.compile import report as compile_report

    row = {"tokens_per_s": 1000.0, "warmup_s": 2.0, "peak_mb": 500.0, "added_mb": 10.0}
    text = compile_report({"machine": {"cpu": "x", "cores": 2, "torch": "t", "date": "d"}, "config": "q.yaml",
                           "sets": [], "steps": 40, "warmup": 3, "rounds": 2, "loss_gap": 2e-7, "ratio": 1.25,
                           "median": {"eager": row, "compiled": {**row, "tokens_per_s": 1250.0, "warmup_s": 50.0}},
                           "compile_s": [48.0, 12.5]})
    assert "| eager | 1,000 | 2.0 | 500 (10) |" in text and "| compiled | 1,250 | 50.0 | 500 (10) |" in text
    assert "compiled / eager tokens/s: **1.25x**" in text and "48.0, 12.5 s per compiled run" in text
    with pytest.raises(SystemExit, match="--warmup 5: must be at least 0 and below --steps 5"):
        compile_main(["--steps", "5", "--warmup", "5"])
    with pytest.raises(SystemExit, match="train.steps"):
        compile_main(["--set", "train.steps=-1"])
