"""Layout sweeps: every point of a grid trains for real under torchrun, measured from inside.

    python -m bench sweep configs/sweeps/cpu.yaml --out bench/results/sweep-cpu

A sweep file names a base run config, overrides for all points, the timed/warm-up steps and a grid of
dotted config keys (plus ``data``: the data-parallel degree; processes = tensor x pipeline x data).
Per point: tokens/s, step time split into forward / backward / optimizer, communication seconds, bytes and
calls per group (tp, dp, pp), pipeline bubble (measured and theory), parameter and optimizer-state bytes per
rank next to the ZeRO formula, peak RSS (CPU) or peak allocated memory (GPU), MFU / HFU on GPU; derived:
scaling efficiency against the one-process point, communication share, predicted communication time from a
``bench comm`` fit. A point that fails or times out is recorded with its error and the sweep goes on.
Outputs in ``--out``: results.jsonl, results.csv, report.md, PNG plots, and a W&B run per point (offline
by default) grouped by sweep.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from bench.cli import RESULTS
from bench.formulas import decoder_params, decoder_shape, flops_per_token, zero_formula_bytes
from bench.launch import first_error
from parallel.schedules import simulate

PROG = "bench sweep"

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def load_sweep(path: str | Path) -> dict:
    """The sweep file's spec; ValueError naming the file and what is wrong with it."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the sweep file ({exc.strerror}); see configs/sweeps/*.yaml") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping (name, base, grid, ...), got {type(spec).__name__}")
    unknown = set(spec) - {"name", "base", "set", "grid", "warmup_steps", "timed_steps", "comm_probe_steps",
                           "timeout_s", "comm_fit", "wandb", "baselines", "baseline_rounds", "exclude", "rounds"}
    if unknown:
        raise ValueError(f"{path}: unknown sweep keys {sorted(unknown)}")
    for key in ("name", "base", "grid"):
        if key not in spec:
            raise ValueError(f"{path}: sweep file needs '{key}'")
    bad = [k for k, v in (spec["grid"] or {}).items() if not isinstance(v, list) or not v] \
        if isinstance(spec["grid"], dict) else ["grid"]
    if bad:
        raise ValueError(f"{path}: grid.{bad[0]}: expected a non-empty list of values, e.g. [1, 2]")
    return spec


def invalid_points(spec: dict) -> list[str]:
    """Every grid point (and baseline comparison point) whose run config fails the checks train.py applies
    before launching, at the world size the sweep would launch it: one line per distinct problem, with the
    points that have it."""
    from bench.cli import config_problem

    problems: dict[str, list[str]] = {}
    for point in points(spec) + [entry["compare"] for entry in spec.get("baselines", [])]:
        sets, nproc = point_overrides(spec, point)
        problem = config_problem(spec["base"], sets, nproc)
        if problem:
            problems.setdefault(problem, []).append(f"{_label(point)} ({_processes(nproc)})")
    return [f"{len(where)} point(s) [{'; '.join(where)}]: {problem}" for problem, where in problems.items()]


def _label(point: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def _processes(n: int) -> str:
    return f"{n} process{'es' * (n != 1)}"


def points(spec: dict) -> list[dict]:
    """Cartesian product of the grid, less the points matching an ``exclude`` entry (a dict of some of the
    grid's keys); each point a dict of dotted key -> value (``data`` = DP degree)."""
    keys = list(spec["grid"])
    grid = [dict(zip(keys, values)) for values in itertools.product(*(spec["grid"][k] for k in keys))]
    excluded = spec.get("exclude", [])
    return [p for p in grid if not any(all(p.get(k) == v for k, v in rule.items()) for rule in excluded)]


def point_overrides(spec: dict, point: dict) -> tuple[list[str], int]:
    steps = spec.get("warmup_steps", 2) + spec.get("timed_steps", 4) + spec.get("comm_probe_steps", 2)
    sets = {**spec.get("set", {}), "train.steps": steps, "train.progress": False,
            "train.export_hf": False, "train.save_final": False, "logging.wandb.mode": "disabled"}
    sets.update({k: v for k, v in point.items() if k != "data"})
    tensor, pipeline = int(sets.get("parallel.tensor", 1)), int(sets.get("parallel.pipeline", 1))
    nproc = tensor * pipeline * int(point.get("data", 1))
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()], nproc


COMM = ("comm_tp", "comm_dp", "comm_pp", "comm_ep")


def _full_params(config_path: str, sets: list[str]) -> tuple[int, dict]:
    from modeling.build import hf_config, meta_model
    from modeling.experts import active_parameters, experts_modules
    from training.config import load

    cfg = load(config_path, sets)
    model_cfg = hf_config(pretrained=cfg.model.pretrained, arch=cfg.model.arch, config=cfg.model.config)
    shape = decoder_shape(model_cfg)  # gated MLPs, GQA and untied heads counted (GPT-2: PaLM's 12 h^2 + V h)
    model = meta_model(model_cfg, cfg.model.trust_remote_code)  # a mixture of experts: its active parameters
    params = active_parameters(model) if experts_modules(model) else decoder_params(shape)["total"]
    return params, {"cfg": cfg, "layers": shape.layers, "hidden": shape.hidden}


def _tokens_per_step(cfg, nproc: int) -> int:
    """Tokens of one optimizer step over every data-parallel rank."""
    data = nproc // (cfg.parallel.tensor * cfg.parallel.pipeline)
    return cfg.train.micro_batch_size * cfg.train.grad_accum * data * cfg.data.seq_len


def summarize(point: dict, nproc: int, raw: dict, config_path: str, sets: list[str]) -> dict:
    ranks = raw["ranks"]
    params, info = _full_params(config_path, sets)
    cfg = info["cfg"]
    tokens = _tokens_per_step(cfg, nproc)
    step_s = max(r["step_s"] for r in ranks)
    comm = {k: max(r.get(f"{k}_s", 0.0) for r in ranks) for k in COMM}
    record = {**point, "nproc": nproc, "status": "ok", "tokens_per_step": tokens, "step_s": step_s,
              "tokens_per_s": tokens / step_s,
              **{k: statistics.mean(r[f"{k}_s"] for r in ranks) for k in ("forward", "backward", "optimizer")},
              **{f"{k}_s": v for k, v in comm.items()},
              **{f"{k}_bytes": max(r.get(f"{k}_bytes", 0) for r in ranks) for k in COMM},
              "comm_share": sum(comm.values()) / step_s,
              "param_bytes_rank0": ranks[0]["param_bytes"], "gradient_bytes_rank0": ranks[0]["gradient_bytes"],
              "optimizer_state_bytes_rank0": ranks[0]["optimizer_state_bytes"],
              "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in ranks), "model_params": params}
    dp = nproc // (cfg.parallel.tensor * cfg.parallel.pipeline)
    local = ranks[0]["model_params_local"]  # rank 0's stage and tensor shard, unpartitioned (ZeRO-3: ds_numel)
    experts = ranks[0].get("expert_param_bytes", 0) // 4  # its experts (fp32), partitioned over the EDP ranks
    formula = zero_formula_bytes(local - experts, cfg.parallel.zero_stage, dp)
    if experts:
        expert_formula = zero_formula_bytes(experts, cfg.parallel.zero_stage, dp // cfg.parallel.expert)
        formula = {k: v + expert_formula[k] for k, v in formula.items()}
    record.update({f"formula_{k}": v for k, v in formula.items()})
    record["param_vs_formula"] = record["param_bytes_rank0"] / formula["param_bytes"]
    record["optimizer_state_vs_formula"] = record["optimizer_state_bytes_rank0"] / formula["optimizer_state_bytes"]
    if record["gradient_bytes_rank0"] is not None:
        record["gradient_vs_formula"] = record["gradient_bytes_rank0"] / formula["gradient_bytes"]
    p, m, v = cfg.parallel.pipeline, cfg.train.grad_accum, cfg.parallel.virtual_stages
    if p > 1:  # the idle share of the pipeline phase: the optimizer step after the flush is work, not bubble
        busy = statistics.mean(r["forward_s"] + r["backward_s"] for r in ranks)
        pipeline_s = step_s - statistics.mean(r["optimizer_s"] for r in ranks)
        record["bubble_measured"] = max(0.0, 1 - busy / pipeline_s)
        # the schedule's own op lists on a clock (1F1B family: (p-1)/(vm+p-1) whatever the times; ZB-H1: by
        # the measured forward : backward ratio, half of the backward taken as weight gradients)
        record["bubble_theory"] = simulate(cfg.parallel.schedule, p, m, v,
                                           statistics.mean(r["forward_s"] for r in ranks),
                                           statistics.mean(r["backward_s"] for r in ranks))["bubble"]
    # predicted vs measured: the per-call latency + bandwidth prediction against the barrier-separated
    # transfer time of the same calls (TP and DP collectives; pipeline receives also wait for the sender's
    # compute, so they are not a transfer time)
    if any(r.get("comm_tp_predicted_s") or r.get("comm_dp_predicted_s") for r in ranks):
        slowest = max(ranks, key=lambda r: r["comm_tp_transfer_s"] + r["comm_dp_transfer_s"])
        record["comm_predicted_s"] = slowest["comm_tp_predicted_s"] + slowest["comm_dp_predicted_s"]
        record["comm_measured_s"] = slowest["comm_tp_transfer_s"] + slowest["comm_dp_transfer_s"]
        record["comm_wait_s"] = slowest["comm_tp_wait_s"] + slowest["comm_dp_wait_s"]
    record.update(_expert_shares(ranks, cfg, dp))
    record.update(_utilization(record["tokens_per_s"], (params, info["layers"], info["hidden"], cfg.data.seq_len),
                               cfg.parallel.activation_checkpointing, nproc))
    return record


def _expert_shares(ranks: list[dict], cfg, dp: int) -> dict:
    """Expert parameter and optimizer bytes per rank against the expert-parallel share: all experts' fp32
    weights / EP, and AdamW's two fp32 moments of those, partitioned over the expert-data-parallel ranks."""
    if cfg.parallel.expert == 1:
        return {}
    from modeling.build import hf_config, meta_model
    from modeling.experts import experts_modules

    model = meta_model(hf_config(pretrained=cfg.model.pretrained, arch=cfg.model.arch, config=cfg.model.config))
    experts = sum(p.numel() for m in experts_modules(model).values() for p in m.parameters())
    share = 4 * experts / cfg.parallel.expert
    optimizer_share = 2 * share / (dp // cfg.parallel.expert)
    return {"expert_params": experts, "expert_param_bytes_rank0": ranks[0]["expert_param_bytes"],
            "expert_param_vs_share": ranks[0]["expert_param_bytes"] / share,
            "expert_optimizer_bytes_rank0": ranks[0]["expert_optimizer_state_bytes"],
            "expert_optimizer_vs_share": ranks[0]["expert_optimizer_state_bytes"] / optimizer_share}


def _utilization(tokens_per_s: float, shape: tuple, recompute: str, nproc: int) -> dict:
    """MFU and HFU on a GPU of known peak (``flops_per_token`` of ``shape``: params, layers, hidden, seq_len;
    HFU counts the recomputation); nothing elsewhere."""
    import torch

    if not torch.cuda.is_available():
        return {}
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if not peak:
        return {}
    return {"mfu": tokens_per_s * flops_per_token("none", *shape) / (peak * 1e12 * nproc),
            "hfu": tokens_per_s * flops_per_token(recompute, *shape) / (peak * 1e12 * nproc)}


def median_run(runs: list[dict]) -> dict:
    """One point's record over its ``rounds`` runs: the run of median step time, with every run's step time
    and bubble beside it."""
    done = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["step_s"])
    if len(runs) == 1 or not done:
        return runs[0]
    chosen = dict(done[(len(done) - 1) // 2])
    chosen["rounds_step_s"] = [r["step_s"] for r in runs if r["status"] == "ok"]
    if "bubble_measured" in chosen:
        chosen["rounds_bubble"] = [r["bubble_measured"] for r in runs if r["status"] == "ok"]
        chosen["bubble_measured"] = statistics.median(chosen["rounds_bubble"])
    return chosen


def run_point(spec: dict, point: dict, out: Path, index: int) -> dict:
    sets, nproc = point_overrides(spec, point)
    out_file = out / "points" / f"point{index:03d}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    sets = sets + [f"train.output_dir={out / 'points' / f'run{index:03d}'}"]
    extra = ["--worker", "--out-file", str(out_file)]
    extra += ["--comm-fit", spec["comm_fit"]] if spec.get("comm_fit") else []
    proc = _launch(spec, nproc, index, extra, sets)
    if isinstance(proc, str):
        return {**point, "nproc": nproc, "status": "failed", "error": proc}
    if proc.returncode != 0 or not out_file.is_file():
        log = (proc.stderr or "") + (proc.stdout or "")
        return {**point, "nproc": nproc, "status": "failed", "error": first_error(log), "log_tail": log[-2000:]}
    return summarize(point, nproc, json.loads(out_file.read_text()), spec["base"], sets)


def _launch(spec: dict, nproc: int, index: int, extra: list[str], sets: list[str]) -> subprocess.CompletedProcess | str:
    from bench.launch import torchrun

    try:
        return torchrun("bench.sweep", nproc, ["--config", spec["base"], "--warmup", str(spec.get("warmup_steps", 2)),
                                               "--timed", str(spec.get("timed_steps", 4)), *extra],
                        sets=sets, port=29500 + 17 * (index % 200) + 7, timeout=spec.get("timeout_s", 900))
    except subprocess.TimeoutExpired:
        return f"timed out after {spec.get('timeout_s', 900)}s"


def _baseline_step_s(spec: dict, kind: str, sets: list[str], nproc: int, out_file: Path, port_index: int):
    """The baseline's median step seconds, or (None, error, log tail)."""
    proc = _launch(spec, nproc, port_index, ["--baseline", kind, "--out-file", str(out_file)], sets)
    if isinstance(proc, str) or proc.returncode != 0 or not out_file.is_file():
        log = proc if isinstance(proc, str) else (proc.stderr or "") + (proc.stdout or "")
        return None, first_error(log), log[-2000:]
    return json.loads(out_file.read_text())["step_s"], None, None


def run_baseline(spec: dict, entry: dict, out: Path, index: int, records: list[dict]) -> dict:
    """A baseline on the settings of its ``compare`` point, reported as colonnade's tokens/s over its own.
    With ``baseline_rounds`` >= 2 the baseline and a fresh run of the colonnade point alternate (ABBA) and
    each side's median step is compared, so drift of the machine falls on both; with 1 the grid point's
    own measurement is used."""
    kind, compare = entry["kind"], entry["compare"]
    sets, nproc = point_overrides(spec, compare)
    out_file = out / "points" / f"baseline{index:03d}-{kind}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    record = {"baseline": kind, **compare, "nproc": nproc}
    rounds = spec.get("baseline_rounds", 1)
    ours = next((r for r in records if r.get("status") == "ok" and all(r.get(k) == v for k, v in compare.items())),
                None)
    baseline_steps, our_steps = [], []
    for round_ in range(rounds):
        for side in (("baseline", "colonnade") if round_ % 2 == 0 else ("colonnade", "baseline")):
            if side == "baseline":
                step_s, error, log = _baseline_step_s(spec, kind, sets, nproc, out_file, 100 + index)
                if step_s is None:
                    return {**record, "status": "failed", "error": error, "log_tail": log}
                baseline_steps.append(step_s)
            elif rounds > 1:
                again = run_point(spec, compare, out, 200 + index)
                if again.get("status") == "ok":
                    our_steps.append(again["step_s"])
    cfg = _full_params(spec["base"], sets)[1]["cfg"]
    tokens = _tokens_per_step(cfg, nproc)
    step_s = statistics.median(baseline_steps)
    record.update(status="ok", step_s=step_s, tokens_per_s=tokens / step_s, baseline_step_s_runs=baseline_steps)
    if our_steps:
        record.update(colonnade_tokens_per_s=tokens / statistics.median(our_steps), colonnade_step_s_runs=our_steps)
    elif ours:
        record["colonnade_tokens_per_s"] = ours["tokens_per_s"]
    if "colonnade_tokens_per_s" in record:
        record["colonnade_vs_baseline"] = record["colonnade_tokens_per_s"] / record["tokens_per_s"]
    return record


def derive(records: list[dict]) -> None:
    """Scaling efficiency against the one-process point: tokens/s / (processes x one-process tokens/s). With
    the global batch fixed (TP, PP) that is strong scaling, T1 / (N TN); with the batch grown N times (pure DP)
    weak scaling, T1 / TN; ``scaling`` says which (``mixed`` for DP combined with TP or PP)."""
    base = next((r for r in records if r.get("status") == "ok" and r["nproc"] == 1), None)
    for r in records:
        if base and r.get("status") == "ok":
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["nproc"] * base["tokens_per_s"])
            growth = r["tokens_per_step"] / base["tokens_per_step"]
            r["scaling"] = "strong" if growth == 1 else "weak" if growth == r["nproc"] else "mixed"


def write_outputs(records: list[dict], out: Path, spec: dict, machine: dict) -> None:
    from bench.report import plots, report_markdown

    with (out / "results.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps({**r, "machine": machine, "sweep": spec["name"]}) + "\n")
    columns = sorted({k for r in records for k in r})
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    figures = plots(records, out)
    (out / "report.md").write_text(report_markdown(records, spec, machine, figures))


def log_wandb(records: list[dict], out: Path, spec: dict) -> None:
    mode = spec.get("wandb", {}).get("mode", "offline")
    if mode == "disabled":
        return
    import wandb

    for r in records:
        run = wandb.init(project=spec.get("wandb", {}).get("project", "colonnade-sweeps"), group=spec["name"],
                         name=" ".join([r.get("baseline", "colonnade")] + [f"{k}={v}" for k, v in r.items()
                                                                           if k in spec["grid"]]), mode=mode,
                         dir=str(out), config={k: r[k] for k in spec["grid"] if k in r}, reinit="finish_previous")
        run.summary.update({k: v for k, v in r.items() if isinstance(v, (int, float, str))})
        run.finish()
    run = wandb.init(project=spec.get("wandb", {}).get("project", "colonnade-sweeps"), group=spec["name"],
                     name=f"{spec['name']}-summary", mode=mode, dir=str(out), reinit="finish_previous")
    columns = sorted({k for r in records for k in r if k != "error"})
    run.log({"results": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in records])})
    artifact = wandb.Artifact(f"{spec['name']}-report", type="report")
    for path in [out / "report.md", *out.glob("*.png")]:
        artifact.add_file(str(path))
    run.log_artifact(artifact)
    run.finish()


def main(argv=None) -> list[dict]:
    """The sweep's records. Exit code 2 (one line per problem) when the sweep file or any point's config is bad,
    before the first run; 1 after the outputs are written when a point or baseline failed."""
    parser = argparse.ArgumentParser(prog="python -m bench sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", help="sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("--out", default=str(RESULTS / "sweep"), help="where the outputs go (default: this "
                        "repository's bench/results/sweep, whatever the current directory)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--out-file", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--timed", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--comm-fit", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", choices=["plain", "ddp", "deepspeed", "pipelining"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from bench.sweep_worker import worker

        worker(args)
        return []
    if args.baseline:
        from bench.baselines import worker as baseline_worker

        baseline_worker(args)
        return []
    if not args.sweep:
        parser.error("give a sweep YAML")
    from bench.cli import fail

    try:
        spec = load_sweep(args.sweep)
    except ValueError as exc:
        fail(PROG, str(exc))
    problems = invalid_points(spec)
    if problems:
        fail(PROG, *[f"{args.sweep}: {problem}" for problem in problems])
    out = Path(args.out)
    print(f"{PROG}: outputs go to {out.resolve()}", file=sys.stderr)
    records = run_sweep(spec, out)
    failed = [r for r in records if r["status"] != "ok"]
    print(f"{len(records) - len(failed)} points ok, {len(failed)} failed; report: {out / 'report.md'}")
    for r in failed:
        point = {k: v for k, v in r.items() if k == "data" or "." in k}  # the point's own keys
        print(f"{PROG}: failed: {r.get('baseline', 'point')} {_label(point)} ({_processes(r['nproc'])}): "
              f"{r.get('error', '')}", file=sys.stderr)
    if failed:
        raise SystemExit(1)
    return records


def run_sweep(spec: dict, out: Path) -> list[dict]:
    """Every point (``rounds`` times, ABBA) and baseline of ``spec``, with progress; the outputs in ``out``."""
    from tqdm import tqdm

    from bench.machine import describe

    out.mkdir(parents=True, exist_ok=True)
    grid = points(spec)
    baselines = spec.get("baselines", [])
    records, baseline_records = [], []
    rounds = spec.get("rounds", 1)
    with tqdm(total=len(grid) * rounds + len(baselines), unit="point", desc=spec["name"]) as bar:
        runs: dict[int, list[dict]] = {}
        for round_ in range(rounds):  # ABBA: every other round runs the grid backwards
            for index in (range(len(grid)) if round_ % 2 == 0 else reversed(range(len(grid)))):
                bar.set_postfix_str(_label(grid[index]))
                runs.setdefault(index, []).append(run_point(spec, grid[index], out, index + round_ * len(grid)))
                bar.update(1)
        records += [median_run(runs[index]) for index in range(len(grid))]
        for index, entry in enumerate(baselines):
            bar.set_postfix_str(f"baseline {entry['kind']}")
            baseline_records.append(run_baseline(spec, entry, out, index, records))
            bar.update(1)
    derive(records)
    records += baseline_records
    write_outputs(records, out, spec, describe())
    log_wandb(records, out, spec)
    return records

if __name__ == "__main__":
    main()
