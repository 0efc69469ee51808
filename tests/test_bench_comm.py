"""bench comm: nccl-tests bus-bandwidth formulas, the latency/bandwidth fit, and a tiny real run."""

from __future__ import annotations

import json

import pytest

from bench.comm import bus_factor, fit_latency_bandwidth, main, predict_seconds


@pytest.mark.unit
def test_busbw_formulas():
    assert bus_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    assert bus_factor("all_gather", 4) == pytest.approx(3 / 4)
    assert bus_factor("reduce_scatter", 2) == pytest.approx(1 / 2)
    assert bus_factor("broadcast", 8) == 1.0 and bus_factor("send_recv", 2) == 1.0


@pytest.mark.unit
def test_fit_recovers_latency_and_bandwidth():
    points = [(n, 50e-6 + n / 2e9) for n in (1 << 10, 1 << 16, 1 << 20, 1 << 24)]
    fit = fit_latency_bandwidth(points)
    assert fit["alpha_s"] == pytest.approx(50e-6, rel=1e-6)
    assert fit["bandwidth_Bps"] == pytest.approx(2e9, rel=1e-6)
    assert predict_seconds(fit, 1 << 22) == pytest.approx(50e-6 + (1 << 22) / 2e9)


@pytest.mark.subprocess
def test_comm_benchmark_runs_end_to_end(tmp_path):
    result = main(["--nproc", "2", "--min-size", "1K", "--max-size", "16K", "--iters", "3", "--out", str(tmp_path)])
    ops = {r["op"] for r in result["rows"]}
    assert ops == {"all_reduce", "all_gather", "reduce_scatter", "broadcast", "send_recv"}
    for row in result["rows"]:
        assert row["raw_s"] > 0 and row["raw_busbw_GBps"] == pytest.approx(
            row["raw_algbw_GBps"] * bus_factor(row["op"], row["ranks"]))
    saved = json.loads(next(tmp_path.glob("comm-*.json")).read_text())
    assert set(saved["fit"]) == ops and next(tmp_path.glob("comm-*.md")).read_text().startswith("| op |")
