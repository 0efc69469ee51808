"""Tables and PNG plots for sweep results."""

from __future__ import annotations

from pathlib import Path

PARALLEL_KEYS = ("parallel.tensor", "parallel.pipeline", "data", "parallel.zero_stage", "parallel.schedule")


def point_label(r: dict) -> str:
    """A sweep point's label: its parallel keys first (layout, ZeRO stage, schedule), then any other config key
    the grid set (dotted names; measurements have none)."""
    others = [k for k in r if "." in k and k not in PARALLEL_KEYS]
    return " ".join(f"{k.split('.')[-1]}={r[k]}" for k in [*(k for k in PARALLEL_KEYS if k in r), *others])


def _one_line(error: str, width: int = 240) -> str:
    """A failed point's error in a table cell: its lines joined (a config error's reason is on its second)."""
    return " ".join(error.split())[:width].replace("|", "/")


def _fmt(value, digits=3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def report_markdown(records: list[dict], spec: dict, machine: dict, figures: list[str]) -> str:
    baselines = [r for r in records if "baseline" in r]
    records = [r for r in records if "baseline" not in r]
    lines = [f"# Sweep `{spec['name']}`", "",
             f"Machine: {machine.get('gpu') or machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
             f"{machine['date']}. Base config `{spec['base']}`; {spec.get('warmup_steps', 2)} warm-up + "
             f"{spec.get('timed_steps', 4)} timed steps per point (medians; the slowest rank's step).", ""]
    lines += _points_table(records)
    if baselines:
        lines += _baselines_table(baselines, spec.get("baseline_rounds", 1))
    lines += _prediction_table(records)
    lines += _experts_table(records)
    if spec.get("comm_fit") and Path(spec["comm_fit"]).is_file():
        import json

        from bench.comm import summary

        comm = json.loads(Path(spec["comm_fit"]).read_text())
        lines += ["", f"Collectives, raw `torch.distributed` vs colonnade's layer (`{spec['comm_fit']}`, "
                  f"{comm['nproc']} processes, {comm['machine']['date']}). " + summary(comm["rows"], comm["fit"])]
    lines += ["", "Forward / backward / optimizer include the communication issued inside them; the comm columns "
              "break that out per group. Bubble measured: 1 − (forward + backward) / (step − optimizer), the idle "
              "share of the pipeline phase (the optimizer step after the flush is work, not bubble); theory: the "
              "schedule's operation lists played on a clock (`parallel.schedules.simulate`): (p − 1) / (v·m + p − 1) "
              "for GPipe and the 1F1B family; for ZB-H1 from the measured forward : backward ratio, half of the "
              "backward taken as weight gradients.", ""]
    lines += _rounds_table(records)
    lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(lines) + "\n"


def _points_table(records: list[dict]) -> list[str]:
    lines = ["| point | procs | status | tokens/s | step s | fwd s | bwd s | opt s | comm TP s | comm DP s | "
             "comm PP s | comm share | scaling eff. | bubble meas./theory | param bytes / formula | "
             "grad bytes / formula | opt-state bytes / formula | peak RSS MiB |", "|" + "---|" * 18]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {point_label(r)} | {r['nproc']} | failed: {_one_line(r.get('error', ''))} |" + " |" * 15)
            continue
        bubble = (f"{r['bubble_measured']:.3f} / {r['bubble_theory']:.3f}" if "bubble_theory" in r else "—")
        lines.append(
            f"| {point_label(r)} | {r['nproc']} | ok | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | "
            f"{r['forward']:.3f} | {r['backward']:.3f} | {r['optimizer']:.3f} | {r['comm_tp_s']:.3f} | "
            f"{r['comm_dp_s']:.3f} | {r['comm_pp_s']:.3f} | {r['comm_share']:.1%} | "
            f"{_fmt(r.get('scaling_efficiency'))} {r.get('scaling', '')} | "
            f"{bubble} | {_fmt(r.get('param_vs_formula'), 4)} | {_fmt(r.get('gradient_vs_formula'), 4)} | "
            f"{r['optimizer_state_vs_formula']:.3f} | "
            f"{r['peak_rss_bytes_max'] / 2**20:.0f} |")
    return lines


def _experts_table(records: list[dict]) -> list[str]:
    """Expert parallelism's points: the all-to-all per step and the expert bytes per rank against the EP share
    (all experts' fp32 weights / EP; AdamW's two moments of those over the expert-data-parallel ranks)."""
    experts = [r for r in records if r.get("status") == "ok" and "expert_params" in r]
    if not experts:
        return []
    mib = 2**20
    lines = ["", "Expert parallelism (all-to-all = the token exchanges; expert bytes of rank 0 / the EP share):", "",
             "| point | procs | all-to-all s | all-to-all MiB | DP reduction MiB | expert params MiB / share | "
             "expert optimizer MiB / share |", "|---|---|---|---|---|---|---|"]
    for r in experts:
        lines.append(f"| {point_label(r)} | {r['nproc']} | {r['comm_ep_s']:.3f} | {r['comm_ep_bytes'] / mib:.1f} | "
                     f"{r['comm_dp_bytes'] / mib:.1f} | {r['expert_param_bytes_rank0'] / mib:.1f} / "
                     f"{r['expert_param_vs_share']:.3f} | {r['expert_optimizer_bytes_rank0'] / mib:.1f} / "
                     f"{r['expert_optimizer_vs_share']:.3f} |")
    return lines


def _baselines_table(baselines: list[dict], rounds: int) -> list[str]:
    how = (f"{rounds} alternating rounds of the baseline and a fresh run of the colonnade point (ABBA), "
           f"medians" if rounds > 1 else "the colonnade number is the grid point's")
    lines = ["", "Baselines on the same model, data, batch and steps, run in the same sweep "
             f"(colonnade tokens/s ÷ baseline tokens/s; {how}):", "",
             "| baseline | point | procs | status | baseline tokens/s | colonnade tokens/s | colonnade / baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in baselines:
        if r.get("status") != "ok":
            lines.append(f"| {r['baseline']} | {point_label(r)} | {r['nproc']} | "
                         f"failed: {_one_line(r.get('error', ''))} | | | |")
            continue
        lines.append(f"| {r['baseline']} | {point_label(r)} | {r['nproc']} | ok | {r['tokens_per_s']:.0f} | "
                     f"{_fmt(r.get('colonnade_tokens_per_s'), 4)} | {_fmt(r.get('colonnade_vs_baseline'))} |")
    return lines


def _prediction_table(records: list[dict]) -> list[str]:
    predicted = [r for r in records if r.get("comm_measured_s")]
    if not predicted:
        return []
    lines = ["", "TP + DP communication per step: predicted call by call from the `bench comm` latency + bandwidth "
             "fit, vs the measured transfer time of the same calls (a barrier before each collective separates "
             "the wait for the group's slowest rank, shown apart):", "",
             "| point | procs | predicted s | measured transfer s | predicted / measured | wait s |",
             "|---|---|---|---|---|---|"]
    for r in predicted:
        lines.append(f"| {point_label(r)} | {r['nproc']} | {r['comm_predicted_s']:.4f} | {r['comm_measured_s']:.4f} | "
                     f"{r['comm_predicted_s'] / r['comm_measured_s']:.2f} | {r['comm_wait_s']:.4f} |")
    return lines


def _rounds_table(records: list[dict]) -> list[str]:
    """Each round of the points a sweep ran ``rounds`` times in ABBA order (the table above shows medians)."""
    repeated = [r for r in records if "rounds_step_s" in r]
    if not repeated:
        return []
    lines = ["Rounds (ABBA order; the table above holds each point's median):", "",
             "| point | step s per round | bubble per round |", "|---|---|---|"]
    for r in repeated:
        bubbles = ", ".join(f"{b:.3f}" for b in r.get("rounds_bubble", []))
        lines.append(f"| {point_label(r)} | {', '.join(f'{s:.3f}' for s in r['rounds_step_s'])} | {bubbles or '—'} |")
    return lines + [""]


def plots(records: list[dict], out: Path) -> list[str]:
    """The sweep's figures (throughput, communication share, memory vs formula, bubble) as PNGs in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok" and "baseline" not in r]
    piped = [r for r in ok if "bubble_theory" in r]
    figures = []
    for name, draw, points in (("throughput.png", _throughput, ok), ("comm_share.png", _comm_share, ok),
                               ("memory.png", _memory, ok), ("bubble.png", _bubble, piped)):
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, points)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        figures.append(str(out / name))
    return figures


def _throughput(ax, ok: list[dict]) -> None:
    by_layout: dict[str, list] = {}
    for r in ok:
        key = " ".join(f"{k.split('.')[-1]}={r[k]}" for k in PARALLEL_KEYS if k in r and k != "data")
        by_layout.setdefault(key, []).append((r["nproc"], r["tokens_per_s"]))
    for key, pts in by_layout.items():
        pts.sort()
        ax.plot([p for p, _ in pts], [t for _, t in pts], marker="o", label=key or "all")
    ax.set(xlabel="processes", ylabel="tokens/s", title="Throughput vs processes")
    ax.legend(fontsize=7)


def _comm_share(ax, ok: list[dict]) -> None:
    bottom = [0.0] * len(ok)
    for group in ("comm_tp_s", "comm_dp_s", "comm_pp_s", "comm_ep_s"):
        share = [r.get(group, 0.0) / r["step_s"] for r in ok]
        ax.bar(range(len(ok)), share, bottom=bottom, label=group.split("_")[1].upper())
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.set_xticks(range(len(ok)), [point_label(r) for r in ok], rotation=60, ha="right", fontsize=6)
    ax.set(ylabel="share of step time", title="Communication share per group")
    ax.legend()


def _memory(ax, ok: list[dict]) -> None:
    x = range(len(ok))
    bars = (("optimizer_state_bytes_rank0", "optimizer state, measured"), ("formula_optimizer_state_bytes", "formula"),
            ("gradient_bytes_rank0", "gradients, measured"), ("formula_gradient_bytes", "formula"))
    for offset, (key, label) in zip((-0.3, -0.1, 0.1, 0.3), bars):
        ax.bar([i + offset for i in x], [(r[key] or 0) / 2**20 for r in ok], width=0.2, label=label)
    ax.set_xticks(list(x), [point_label(r) for r in ok], rotation=60, ha="right", fontsize=6)
    ax.set(ylabel="bytes per rank (MiB)", title="Memory per rank by ZeRO stage vs formula")
    ax.legend(fontsize=7)


def _bubble(ax, piped: list[dict]) -> None:
    x = range(len(piped))
    ax.bar([i - 0.2 for i in x], [r["bubble_measured"] for r in piped], width=0.4, label="measured")
    ax.bar([i + 0.2 for i in x], [r["bubble_theory"] for r in piped], width=0.4, label="theory (simulated schedule)")
    ax.set_xticks(list(x), [point_label(r) for r in piped], rotation=60, ha="right", fontsize=6)
    ax.set(ylabel="bubble share", title="Pipeline bubble: measured vs theory")
    ax.legend()
