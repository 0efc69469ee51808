"""bench compression: the ratios and bars by hand (the gradient-only ratio with the ZeRO-1 all-gather taken out),
bad input refused before a launch, and one --quick run of the command (tiny GPT-2, ZeRO-0 and ZeRO-1 at DP=2):
the report and results are written and the ZeRO-0 byte ratios are within issue 35's bars."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import BadInput
from bench.compression import add_ratios, bars, gradient_only_ratio, main, ratio

ROOT = Path(__file__).resolve().parents[1]


def _run(loss: float, sent: float, bleu: float | None = None, first: float = 9.0) -> dict:
    return {"final_eval_loss": loss, "first_eval_loss": first, "final_bleu": bleu, "dp_bytes_sent": sent}


@pytest.mark.unit
def test_ratios_and_bars_by_hand():
    assert ratio(3.0, 4.0) == 0.75 and ratio(None, 4.0) is None and ratio(1.0, 0) is None
    # ZeRO-1 none: all-reduce 2G + all-gather G (G = 100): 300; bf16: reduce-scatter 0.5 x G / 2 + 100 = 125
    assert gradient_only_ratio(125, 300, 100) == pytest.approx(0.125)
    parts = {"zero0": {"none": _run(5.0, 200), "bf16": _run(5.0, 101), "int8": _run(5.0, 56),
                       "int4": _run(5.0, 26)},
             "dp2": {"none": _run(4.0, 300), "int8": _run(4.03, 113), "int4": _run(4.07, 108)},
             "translation": {"none": _run(2.0, 50, bleu=30.0), "int8": _run(2.1, 20, bleu=28.5, first=1.9)}}
    assert add_ratios(parts) == {"dp2": 100}
    assert parts["dp2"]["int8"]["gradient_only_ratio"] == pytest.approx(13 / 200)
    assert parts["dp2"]["int8"]["bytes_ratio"] == pytest.approx(113 / 300)
    assert parts["translation"]["int8"]["bleu_difference"] == pytest.approx(-1.5)
    got = {b["bar"]: b["pass"] for b in bars(parts)}
    assert got == {"dp2 int8: final eval loss / none": True,       # 1.0075, within 1 %
                   "dp2 int4: final eval loss / none": True,       # 1.0175, within 2 %
                   "zero0 bf16: dp_bytes_sent / none": True,       # 0.505 <= 0.51
                   "zero0 int8: dp_bytes_sent / none": False,      # 0.28 > 0.27
                   "zero0 int4: dp_bytes_sent / none": True,       # 0.13 <= 0.15
                   "translation int8: final BLEU - none's": False,  # -1.5 points
                   "translation none: trains (final eval loss / first)": True,
                   "translation int8: trains (final eval loss / first)": False}  # 2.1 after 1.9
    parts["dp2"]["int4"]["final_eval_loss"] = 3.91                 # 0.9775: 2.25 % better is also outside
    add_ratios(parts)
    assert not next(b for b in bars(parts) if b["bar"].startswith("dp2 int4"))["pass"]


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [(["--modes", "int8"], "add none"),
                                           (["--parts", "dp3"], "unknown dp3"),
                                           (["--steps", "0"], "--steps 0: must be at least 1")])
def test_bad_input_is_one_line_before_any_launch(argv, message, capsys):
    with pytest.raises(BadInput) as raised:
        main(argv)
    assert raised.value.code == 2 and message in str(raised.value)
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.subprocess
@pytest.mark.slow
def test_quick_run_writes_the_report_and_zero0_bytes_are_within_the_bars(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "bench", "compression", "--quick", "--parts", "zero0,dp2",
                           "--modes", "none,bf16,int8,int4", "--scratch", str(tmp_path), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"report.md", "results.json", "eval_loss.png", "train_loss.png"} <= {p.name for p in out.iterdir()}
    result = json.loads((out / "results.json").read_text())
    assert set(result["parts"]) == {"zero0", "dp2"} and set(result["parts"]["zero0"]) == {"none", "bf16", "int8",
                                                                                          "int4"}
    zero0 = {b["bar"].split(":")[0]: b for b in result["bars"] if b["bar"].startswith("zero0")}
    assert set(zero0) == {"zero0 bf16", "zero0 int8", "zero0 int4"}
    assert all(b["pass"] for b in zero0.values()), zero0
    # ZeRO-1's all-gather: a third of none's bytes (all-reduce 2 G + all-gather G); compression keeps it
    dp2 = result["parts"]["dp2"]
    assert result["allgather_bytes"]["dp2"] == pytest.approx(dp2["none"]["dp_bytes_sent"] / 3, rel=0.01)
    assert dp2["int8"]["gradient_only_ratio"] < 0.14 and dp2["none"]["steps"] == 4
    assert len(dp2["none"]["eval_curve"]) == 2
    assert "| zero0 int8: dp_bytes_sent / none |" in (out / "report.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench-compression-")]  # the runs are removed
