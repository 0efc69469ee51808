"""bench sweep on a small grid: every output file with its fields, and a failing point recorded, not fatal."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from bench.formulas import zero_formula_bytes
from bench.sweep import main, points

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_zero_formula():
    def row(params, gradients, optimizer_state):
        return {"param_bytes": params, "gradient_bytes": gradients, "optimizer_state_bytes": optimizer_state}

    assert zero_formula_bytes(1000, 0, 4) == row(4000, 4000, 8000)
    assert zero_formula_bytes(1000, 1, 4) == row(4000, 4000, 2000)
    assert zero_formula_bytes(1000, 2, 4) == row(4000, 1000, 2000)
    assert zero_formula_bytes(1000, 3, 4) == row(1000, 1000, 2000)


@pytest.mark.subprocess
def test_sweep_two_points_one_failing(tmp_path, monkeypatch):
    """Also runs every baseline once (plain, DDP, DeepSpeed alone, torch.distributed.pipelining) and the
    predicted-vs-measured communication of the TP point, using the committed CPU `bench comm` fit."""
    monkeypatch.chdir(ROOT)
    spec = yaml.safe_load((ROOT / "configs/sweeps/tiny.yaml").read_text())
    spec["grid"] = {"parallel.tensor": [1, 2, 3]}  # 3 does not divide the 4 heads: that point must fail
    spec["wandb"] = {"mode": "offline"}
    spec["baselines"] = [{"kind": "plain", "compare": {"parallel.tensor": 1}},
                         {"kind": "ddp", "compare": {"data": 2}},
                         {"kind": "deepspeed", "compare": {"data": 2, "parallel.zero_stage": 2}},
                         {"kind": "pipelining", "compare": {"parallel.pipeline": 2}}]
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    assert len(points(spec)) == 3
    with pytest.raises(SystemExit) as exited:  # a point failed: exit code 1, after every output is written
        main([str(sweep_file), "--out", str(tmp_path / "out")])
    assert exited.value.code == 1
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    one, ok, failed, *baselines = records
    assert one["status"] == ok["status"] == "ok" and failed["status"] == "failed"
    assert [b["baseline"] for b in baselines] == ["plain", "ddp", "deepspeed", "pipelining"]
    for b in baselines:
        assert b["status"] == "ok" and b["tokens_per_s"] > 0, b
    assert ok["comm_tp_bytes"] > 0 and ok["comm_predicted_s"] > 0 and ok["comm_measured_s"] > 0
    assert "does not divide the model's attention heads" in failed["error"]
    for field in ("tokens_per_s", "step_s", "forward", "backward", "optimizer", "comm_tp_s", "comm_dp_s",
                  "comm_pp_s", "comm_share", "param_bytes_rank0", "optimizer_state_bytes_rank0",
                  "formula_optimizer_state_bytes", "gradient_bytes_rank0", "formula_gradient_bytes",
                  "peak_rss_bytes_max", "scaling_efficiency"):
        assert field in ok, field
    # ZeRO-1 keeps the whole AdamW state of its (TP-sharded) parameters, 8 bytes each, and full fp32 gradients
    assert abs(ok["optimizer_state_vs_formula"] - 1.0) < 0.05
    assert abs(ok["gradient_vs_formula"] - 1.0) < 0.05
    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in lines][:3] == ["ok", "ok", "failed"] and "machine" in lines[0]
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 7
    report = (out / "report.md").read_text()
    assert "| tensor=2" in report and "failed" in report and "| pipelining |" in report
    assert "does not divide the model's attention heads" in report  # the reason, not only the error's first line
    assert "predicted / measured" in report
    for png in ("throughput.png", "comm_share.png", "memory.png"):
        assert (out / png).stat().st_size > 1000
    assert list((out / "wandb").glob("offline-run-*")), "a W&B run per point, offline"


@pytest.mark.unit
def test_wandb_agent_parameters_map_onto_config_keys():
    import train
    from training.config import load

    spec = yaml.safe_load((ROOT / "configs/sweeps/wandb_agent.yaml").read_text())
    agent_args = [f"--{key}={values['values'][-1]}" for key, values in spec["parameters"].items()]
    args = train.parse_args(["--config", str(ROOT / "configs/quickstart.yaml")] + agent_args)
    cfg = load(args.config, args.overrides)
    assert cfg.optim.lr == 3e-4 and cfg.parallel.zero_stage == 2 and cfg.train.micro_batch_size == 8
    args = train.parse_args(["--config", "x.yaml", "--optim.lr", "0.01"])
    assert args.overrides == ["optim.lr=0.01"]


@pytest.mark.unit
def test_exclude_drops_the_matching_points_of_the_grid():
    spec = {"grid": {"data": [1, 2], "parallel.tensor": [1, 2]}, "exclude": [{"data": 2, "parallel.tensor": 2}]}
    assert points(spec) == [{"data": 1, "parallel.tensor": 1}, {"data": 1, "parallel.tensor": 2},
                            {"data": 2, "parallel.tensor": 1}]


@pytest.mark.unit
def test_every_committed_sweep_point_is_a_valid_config(monkeypatch):
    """Sweeps that cannot run here (the GPU check, the GPU grid) are at least valid: each point's config
    passes the same validation train.py applies, at the world size the sweep would launch."""
    from bench.sweep import load_sweep, point_overrides
    from training.config import data_parallel_size, load

    monkeypatch.chdir(ROOT)
    checked = 0
    for path in sorted((ROOT / "configs/sweeps").glob("*.yaml")):
        if path.name.startswith("base_") or "method" in yaml.safe_load(path.read_text()):
            continue  # run bases, and W&B agent sweeps (wandb_agent.yaml, tested above)
        spec = load_sweep(path)
        for point in points(spec):
            sets, nproc = point_overrides(spec, point)
            cfg = load(spec["base"], sets)
            assert data_parallel_size(cfg, nproc) == int(point.get("data", 1)), (path.name, point)
            checked += 1
    if checked < 20:
        pytest.fail(f"only {checked} sweep points found")


@pytest.mark.unit
def test_rounds_report_the_median_run_and_every_round():
    """``rounds:`` repeats each point (ABBA); the record is the run of median step time, the bubble the median of
    the rounds', and the report lists every round."""
    from bench.report import _rounds_table
    from bench.sweep import median_run

    def run(step_s, bubble):
        return {"parallel.pipeline": 2, "nproc": 2, "status": "ok", "step_s": step_s, "bubble_measured": bubble}

    chosen = median_run([run(0.7, 0.30), run(0.5, 0.20), run(0.6, 0.22), {"status": "failed", "nproc": 2}])
    assert chosen["step_s"] == 0.6 and chosen["bubble_measured"] == 0.22
    assert chosen["rounds_step_s"] == [0.7, 0.5, 0.6] and chosen["rounds_bubble"] == [0.30, 0.20, 0.22]
    assert median_run([run(0.5, 0.2)]) == run(0.5, 0.2)
    text = "\n".join(_rounds_table([chosen]))
    assert "| 0.700, 0.500, 0.600 | 0.300, 0.200, 0.220 |" in text


def _tiny_sweep(tmp_path: Path, grid: dict) -> Path:
    spec = yaml.safe_load((ROOT / "configs/sweeps/tiny.yaml").read_text())
    spec.update(grid=grid, wandb={"mode": "disabled"}, base=str(ROOT / spec["base"]))
    spec.pop("comm_fit")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.unit
def test_an_invalid_grid_point_stops_the_sweep_before_any_run(tmp_path, monkeypatch, capsys):
    """Before: a grid with ``parallel.tensr: [1, 2]`` ran every point, recorded only "ConfigError: invalid
    configuration (...)" without the reason, and exited 0."""
    import bench.launch

    monkeypatch.setattr(bench.launch, "torchrun", lambda *a, **k: pytest.fail("a point was launched"))
    sweep = _tiny_sweep(tmp_path, {"parallel.tensr": [1, 2]})
    with pytest.raises(SystemExit) as exited:
        main([str(sweep), "--out", str(tmp_path / "out")])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "parallel.tensr=1" in lines[0] and "parallel.tensr=2" in lines[0], lines
    assert "parallel.tensr: unknown key; did you mean parallel.tensor?" in lines[0]
    assert not (tmp_path / "out").exists()
    # for_world at the point's world size: a global batch that data=2 does not split
    sweep = _tiny_sweep(tmp_path, {"data": [1, 2], "train.global_batch_size": [6], "train.grad_accum": [None]})
    with pytest.raises(SystemExit, match=r"data=2, train.global_batch_size=6.*\(2 processes\).*not divisible"):
        main([str(sweep), "--out", str(tmp_path / "out")])


@pytest.mark.unit
def test_a_point_failing_at_run_time_is_reported_with_its_reason_and_exit_code_1(tmp_path, monkeypatch, capsys):
    """A worker's multi-line error (a config error's reason is on its second line) reaches the record, the
    report and the console whole; the sweep exits 1. Before: the first line only, and exit code 0."""
    import subprocess

    import bench.sweep as sweep_module

    log = ("Traceback (most recent call last):\n[rank0]:   File \"x.py\", line 1, in <module>\n"
           "[rank0]: training.config.ConfigError: invalid configuration (base.yaml):\n"
           "[rank0]:   - parallel.thing: unknown key; did you mean parallel.tensor?\n"
           "[rank0]:   - train.other: must be positive\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    monkeypatch.setattr(sweep_module, "_launch", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", log))
    with pytest.raises(SystemExit) as exited:
        main([str(_tiny_sweep(tmp_path, {"parallel.tensor": [1]})), "--out", str(tmp_path / "out")])
    assert exited.value.code == 1
    reason = ("training.config.ConfigError: invalid configuration (base.yaml): parallel.thing: unknown key; did you "
              "mean parallel.tensor?; train.other: must be positive")
    record = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    assert record["status"] == "failed" and record["error"] == reason
    assert reason in (tmp_path / "out" / "report.md").read_text()
    assert f"bench sweep: failed: point parallel.tensor=1 (1 process): {reason}" in capsys.readouterr().err


@pytest.mark.unit
def test_step_observer_times_each_step_and_its_optimizer_phase_from_the_runs_events():
    """``bench.sweep_worker.StepObserver``: one record per ``step`` event with the probe's totals over it, the
    ``optimizer`` phase's seconds added to the probe, the gradient storage counted before each optimizer step,
    and the barrier on from the step after ``barrier_after``."""
    import time
    from types import SimpleNamespace

    import torch

    from bench.instrument import StepProbe
    from bench.sweep_worker import StepObserver

    probe = SimpleNamespace(barrier=False, totals={kind: {} for kind in StepProbe.KINDS})
    probe.snapshot = lambda: {kind: dict(values) for kind, values in probe.totals.items()}
    probe.add = lambda category, seconds: probe.totals["seconds"].__setitem__(
        category, probe.totals["seconds"].get(category, 0.0) + seconds)
    layer = torch.nn.Linear(8, 8)
    layer(torch.ones(2, 8)).sum().backward()
    observer = StepObserver(probe, barrier_after=1)
    observer.on_built(SimpleNamespace(engine=SimpleNamespace(module=layer, optimizer=None)))
    barriers = []
    for step in (1, 2):
        observer.on_phase_start("step", step)
        barriers.append(probe.barrier)
        observer.on_phase_start("optimizer", step)
        time.sleep(0.01)
        observer.on_phase_end("optimizer", step, None)
        observer.on_phase_end("step", step, {"loss": 1.0})
    assert barriers == [False, True]
    assert len(observer.per_step) == 2
    for record in observer.per_step:
        assert record["wall_s"] >= record["seconds"]["optimizer"] >= 0.01
    assert observer.gradient_bytes == [(8 * 8 + 8) * 4] * 2  # the weight's and the bias's .grad
