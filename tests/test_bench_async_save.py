"""bench async_save: the report's arithmetic and bad input as one line (the timings are in bench/results)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_report_and_bad_input():
    from bench.async_save import main as async_main
    from bench.async_save import report as async_report

    text = async_report({"machine": {"cpu": "x", "cores": 2, "torch": "t", "date": "d"}, "params": 2_000_000,
                         "checkpoint_bytes": 24_000_000, "steps": 15, "save_every": 4, "saves_per_run": 3,
                         "rounds": 1, "median_loop_s": {"none": 9.0, "sync": 13.5, "async": 10.5},
                         "cost_per_save_s": {"sync": 1.5, "async": 0.5},
                         "median_checkpoint_s": {"sync": 1.4, "async": 0.1},
                         "async_over_sync": 1 / 3})
    assert "| sync | 13.50 | 1.50 | 1.40 |" in text and "| async | 10.50 | 0.50 | 0.10 |" in text
    assert "async / sync cost per save: **0.33**" in text
    with pytest.raises(SystemExit, match="--save-every at most --steps"):
        async_main(["--steps", "2", "--save-every", "4"])
