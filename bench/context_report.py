"""``bench context``'s report (markdown) and plot (the longest sequence against N) of a results.json."""

from __future__ import annotations

from pathlib import Path

MIB = 2**20

MEASURED = (
    "Peak: the most anonymous resident memory (RssAnon, sampled every millisecond) of a rank during the load, steps "
    "and optimizer phases above its runtime (its RssAnon when the model starts to be built: interpreter, torch, "
    "DeepSpeed, the data), the largest rank's; glibc's mmap threshold at 256 KB in every rank so that resident "
    "memory follows the live tensors. Activations: the most bytes autograd held for the backward at once "
    "(bench memory's SavedActivations), the largest rank's. Step time: the slowest rank's, median over the steps "
    "after the first; tokens/s = seq_len / step time (one sequence per step). Context comm: seconds in the "
    "collectives on the context group (Ulysses' all-to-alls; the ring's sends and their waits), the rank that "
    "spent longest, median over the same steps, and its share of the step; on gloo a collective's time includes "
    "waiting for the slower ranks. Other comm: every other collective (the gradient reduction over data x "
    "context, the loss and norm reductions). Context bytes: sent by one rank over the context group per step, "
    "counted as the flight recorder counts (an all-to-all (N-1)/N of its input), against "
    "bench.formulas.context_attention_bytes x layers.")


def _mb(value) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def fixed_table(rows: list[dict]) -> list[str]:
    lines = ["| N | method | activations MB | activations / N=1 | peak MB | planned peak MB | plan error | step s | "
             "tokens/s | context comm s | comm share | other comm s | context MB sent / formula |",
             "|" + "---|" * 13]
    base = next((r["activation_bytes"] for r in rows if r["context"] == 1 and r["ok"]), None)
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['context']} | failed: {r['error']} |" + " |" * 11)
            continue
        ratio = f"{r['activation_bytes'] / base:.3f}" if base else "-"
        vs = r.get("context_bytes_vs_formula")
        lines.append(
            f"| {r['context']} | {r['method']} | {_mb(r['activation_bytes'])} | {ratio} | {_mb(r['peak_bytes'])} | "
            f"{_mb(r['planned_peak_bytes'])} | {r['plan_error']:+.1%} | {r['step_s']:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {r['context_comm_s']:.2f} | {r['comm_share']:.1%} | "
            f"{r['other_comm_s']:.3f} | {r['context_bytes'] / MIB:,.1f} / {r['formula_context_bytes'] / MIB:,.1f}"
            + (f" ({vs:.3f})" if vs else "") + " |")
    return lines


def longest_table(rows: list[dict]) -> list[str]:
    lines = ["| N | longest seq_len | / N=1 | probes (seq_len: peak MB, fits) | peak MB at longest | step s | "
             "tokens/s | context comm s | comm share |", "|" + "---|" * 9]
    base = next((r["longest"] for r in rows if r["context"] == 1), None)
    for r in rows:
        trials = ", ".join(f"{t['seq_len']}: {_mb(t.get('peak_bytes')) if t['ok'] else 'failed'} "
                           f"{'yes' if t['fits'] else 'no'}" for t in r["trials"])
        at = r.get("at_longest") or {}
        cells = ([_mb(at["peak_bytes"]), f"{at['step_s']:.2f}", f"{at['tokens_per_s']:,.0f}",
                  f"{at['context_comm_s']:.2f}", f"{at['comm_share']:.1%}"] if at.get("ok") else ["-"] * 5)
        ratio = f"{r['longest'] / base:.2f}" if base else "-"
        lines.append(f"| {r['context']} | {r['longest']:,} | {ratio} | {trials} | " + " | ".join(cells) + " |")
    return lines


def report(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Context parallelism ({m['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']})", "",
             f"`{result['command']}`", "", result["model"], "", MEASURED, ""]
    if result.get("fixed"):
        lines += [f"## N = 1, 2, 4 at {result['fixed_seq']:,} tokens", ""] + fixed_table(result["fixed"]) + [""]
    if result.get("longest"):
        lines += [f"## The longest sequence within {result['budget_bytes'] / MIB:,.0f} MiB per rank above the "
                  "runtime", "", "A multiple of 2N x 64 that trained with its peak within the budget; the next "
                  "multiple did not (both probed).", ""] + longest_table(result["longest"]) + [""]
    if result.get("bars"):
        lines += ["## Bars (issue 36)", "", "| bar | goal | measured | pass |", "|---|---|---|---|"]
        lines += [f"| {b['bar']} | {b['goal']} | {b['value']:.3f} | {'yes' if b['pass'] else 'no'} |"
                  for b in result["bars"]]
        lines.append("")
    lines.append(f"Wall time of the command: {result['wall_s'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """The longest sequence against N, with the ideal N x (N=1's) for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.get("longest", []) if r["longest"]]
    if not rows:
        return
    ns = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(ns, [r["longest"] for r in rows], "o-", label="measured")
    base = next((r["longest"] for r in rows if r["context"] == 1), None)
    if base:
        ax.plot(ns, [base * n for n in ns], "--", color="gray", label="N x (N=1)")
    ax.set_xlabel("context-parallel ranks N")
    ax.set_ylabel("longest data.seq_len")
    ax.set_xticks(ns)
    ax.set_title(f"within {result['budget_bytes'] / MIB:,.0f} MiB per rank (above runtime)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
