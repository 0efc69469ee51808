"""`python -m bench`: bad input is one line naming the key, file or value and the fix, exit code 2 (as train.py
and argparse), no traceback, and nothing launched. Each case was, before: a traceback (exit 1), exit code 1,
a launch that failed later, or exit code 0 with a wrong answer (the note beside it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ["--config", "configs/plan_llama7b.yaml", "--device-memory", "40GiB"]

CASES = {  # id: (arguments, what the line must name)
    # before: torchrun started, rank tracebacks, exit 0
    "memory missing config": (["memory", "--config", "nope.yaml"], "config file nope.yaml does not exist"),
    # before: the same, from the config's own check inside each rank
    "memory warm-up beyond steps": (["memory", "--config", "configs/memory_gpt2.yaml", "--set",
                                     "optim.warmup_steps=1000"], "optim.warmup_steps=1000 exceeds train.steps=3"),
    "memory bad layout": (["memory", "--config", "configs/memory_gpt2.yaml", "--layout", "tensor=2,foo=1"],
                          "'foo=1' is not one of tensor=N"),  # before: exit code 1
    # before: IndexError traceback from the chart
    "schedule negative backward": (["schedule", "--backward-time", "-1"], "--backward-time -1"),
    # before: RuntimeError traceback (the simulator deadlocks)
    "schedule chunks without interleaving": (["schedule", "--schedule", "1f1b", "-v", "2"], "-v 2"),
    # before: exit 0, "theory ... = -1.400" (a W op longer than the whole backward)
    "schedule weight beyond backward": (["schedule", "--schedule", "zb-h1", "-p", "2", "-m", "4", "--backward-time",
                                         "2", "--weight-time", "5"], "--weight-time 5"),
    # before: each rank's FileNotFoundError traceback
    "async_save missing files": (["async_save", "--files", "/nonexistent/*.txt"],
                                 "'/nonexistent/*.txt' matches no file"),
    # before: each rank's ValueError traceback from transformers
    "async_save hidden vs heads": (["async_save", "--hidden", "100"], "--hidden 100 is not a multiple"),
    "async_save steps": (["async_save", "--steps", "2"], "--save-every 4 exceeds --steps 2"),  # before: exit 1
    "cpu_adam steps": (["cpu_adam", "--steps", "0"], "--steps 0"),  # before: exit 1
    # before: FileNotFoundError traceback
    "sweep missing file": (["sweep", "configs/sweeps/nope.yaml"], "configs/sweeps/nope.yaml: cannot read"),
    # before: "0 of 0 layouts ... fit", exit 0
    "plan world size 0": (["plan", *LLAMA, "--world-size", "0"], "--world-size 0: must be at least 1"),
    "plan missing config": (["plan", "--config", "no/such.yaml"], "no/such.yaml does not exist"),  # before: exit 1
    "diverge bad layout": (["diverge", "--config", "configs/quickstart.yaml", "--layout", "tensor=2,foo=1"],
                           "'foo=1' is not one of"),  # before: exit 1
    "diverge bad key": (["diverge", "--config", "configs/quickstart.yaml", "--layout", "parallel.tensr=2"],
                        "parallel.tensr: unknown key; did you mean parallel.tensor?"),  # before: a launch, exit 1
    # before: the usage text without saying what was wrong
    "unknown command": (["foo"], "unknown command 'foo'"),
    "no command": ([], "no command given"),
}


@pytest.mark.subprocess
@pytest.mark.parametrize("argv, named", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_exit_2_before_any_launch(argv, named):
    out = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "torchrun" not in out.stderr, out.stderr[-2000:]
    assert len(lines) == 1 and named in lines[0], out.stderr[-2000:]
    assert not out.stdout.strip(), out.stdout[-2000:]


@pytest.mark.subprocess
def test_help_exits_0():
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "commands:" in out.stdout and "diverge" in out.stdout


@pytest.mark.unit
def test_zb_h1_theory_is_the_simulated_bubble_where_it_holds_and_withheld_elsewhere(capsys):
    """Qi et al.'s (p-1)(F+B-W) formula takes B as the input-gradient part of the backward. Inside its domain
    (W <= F, W <= B, m >= p) it equals the simulated bubble; outside, the command says it does not apply instead
    of printing a number (before: W=1.5 of a backward of 3 printed 0.059 beside a simulated 0.086)."""
    from bench.schedule import main, zb_h1_theory
    from parallel.schedules import simulate

    for p, m, backward, weight in [(2, 4, 2, 1), (4, 8, 2, 0.5), (4, 4, 3, 1), (3, 6, 1, 0.25)]:
        value, _ = zb_h1_theory(p, m, backward, weight)
        assert value == pytest.approx(simulate("zb-h1", p, m, 1, 1.0, backward, weight)["bubble"], abs=1e-12)
    for p, m, backward, weight, why in [(2, 4, 3, 1.5, "W=1.5 > F=1"), (2, 4, 1, 0.75, "W=0.75 > B=0.25"),
                                        (4, 2, 2, 1, "m=2 < p=4")]:
        assert zb_h1_theory(p, m, backward, weight) == (None, why)
    main(["--schedule", "zb-h1", "-p", "2", "-m", "4", "--backward-time", "3", "--weight-time", "1.5"])
    assert "does not apply here (W=1.5 > F=1" in capsys.readouterr().out


@pytest.mark.unit
def test_memory_results_go_to_the_repository_results_dir_and_the_console_says_so(tmp_path, monkeypatch, capsys):
    """Without --out, `bench memory` writes under the repository's bench/results/memory (here redirected to a
    temporary one), not the current directory, and says where. The launch is stubbed."""
    import bench.memory as memory

    monkeypatch.setattr(memory, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(memory, "run_variant", lambda args, label, sets, nproc, work, index:
                        {"layout": label, "nproc": nproc, "status": "failed", "log_tail": "stub"})
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    memory.main(["--config", str(ROOT / "configs/memory_gpt2.yaml")])
    assert (tmp_path / "results" / "memory" / "results.json").is_file() and not list(elsewhere.iterdir())
    assert f"results.json and report.md go to {tmp_path / 'results' / 'memory'}" in capsys.readouterr().err
