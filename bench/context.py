"""Context parallelism (``parallel.context``, issue 36): the longest sequence that trains within a memory budget
per rank, activations, throughput and the context group's communication at N = 1, 2, 4.

    python -m bench context --out bench/results/context-cpu
    python -m bench context --quick --out /tmp/context

The model: a Llama from scratch (hidden 256, MLP 688, 4 layers, 8 heads, 4 key/value heads, byte tokenizer;
``MODEL``), fp32, sdpa attention (Ulysses at N = 2, 4: the heads divide), ZeRO-1, micro-batch 1, one sequence
per step (N ranks, one replica), on configs/quickstart.yaml's data (``[a-c]*.py`` of the standard library).

Each probe trains ``--steps`` steps under torchrun with N ranks (one thread each; glibc's mmap threshold at
256 KB, so that resident memory follows the live tensors) and measures on every rank, through the run's observers
(``bench.memory.MemoryObserver``): the **peak** = the most anonymous resident memory (``RssAnon``, sampled every
millisecond) during the load, steps and optimizer phases **above the rank's runtime** (its ``RssAnon`` when the
model starts to be built: interpreter, torch, DeepSpeed, the data), the largest rank's; the activation bytes
(``SavedActivations``: the most bytes autograd held for the backward at once); each step's wall time; and the
seconds and bytes of the context attention's collectives (``CommTimer``: ``all_to_all_single`` for Ulysses,
``batch_isend_irecv`` and its waits for ring, on the context group) and of the others (the gradient reduction
over data x context, the loss and norm reductions).

Parts: ``fixed``: N = 1, 2, 4 at ``--fixed-seq`` tokens (activations per rank, tokens/s, communication share,
bytes against ``bench.formulas.context_attention_bytes``, and ``bench plan``'s planned peak against the measured
one); ``longest``: for each N the longest ``data.seq_len`` (a multiple of 2N x 64) whose probe trains with its
peak within ``--budget`` (``bench.context_search``). Outputs in ``--out``: results.json, report.md, longest.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.launch import add_worker_arguments, ran_as_worker
from training.events import Observer

PROG = "python -m bench context"
CONFIG = "configs/quickstart.yaml"
MODEL = ["model.arch=llama", "model.tokenizer=byte",
         "model.config={hidden_size: 256, intermediate_size: 688, num_hidden_layers: 4, num_attention_heads: 8, "
         "num_key_value_heads: 4, max_position_embeddings: 131072}"]
QUICK_MODEL = ["model.arch=llama", "model.tokenizer=byte",
               "model.config={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, "
               "num_key_value_heads: 4, max_position_embeddings: 131072}"]
COMMON = ['data.train_files=["{stdlib}/[a-c]*.py"]', "data.valid_files=[]", "train.micro_batch_size=1",
          "train.grad_accum=1", "train.eval_every=0", "train.save_final=false", "train.export_hf=false",
          "train.resume=null", "train.progress=false", "train.log_every=1", "optim.warmup_steps=1",
          "logging.wandb.mode=disabled", "parallel.zero_stage=1"]
LIMIT = 131072  # the positions the model has
MMAP_THRESHOLD = 256 * 1024


# --- in each rank ------------------------------------------------------------------------------------------------
class CommTimer(Observer):
    """Seconds and bytes sent of this rank's collectives, ``context`` (on the run's context group) or ``other``,
    and each step's wall time with the collectives' seconds inside it. The ``torch.distributed`` functions are
    wrapped (as ``bench.instrument`` does); the group is told by identity, once the run is built, and by the
    operation (``_category``)."""

    WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "all_to_all_single", "batch_isend_irecv")

    def __init__(self):
        self.seconds = {"context": 0.0, "other": 0.0}
        self.sent = {"context": 0, "other": 0}
        self.steps: list[dict] = []
        self._cp_group = None
        self._began: tuple[float, float, float, int] | None = None

    def install(self) -> CommTimer:
        import torch.distributed as dist

        for name in self.WRAPPED:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))
        return self

    def _category(self, group, name: str) -> str:
        """``context``: the context-parallel attention's own calls (all-to-all, ring transfers) on its group,
        which at one replica is also the data-parallel group (both the whole world): the gradient reduction
        on it is ``other``."""
        ours = name in ("all_to_all_single", "batch_isend_irecv")
        return "context" if ours and group is not None and group is self._cp_group else "other"

    def _wrap(self, name: str, original):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            out = original(*args, **kwargs)
            if name == "batch_isend_irecv":  # the ring's transfers: the time is in the works' waits
                group = args[0][0].group if args and args[0] else None
                self.sent[self._category(group, name)] += _p2p_bytes(args[0])
                return [_TimedWork(work, self, self._category(group, name)) for work in out]
            group = kwargs.get("group", args[2] if name == "all_to_all_single" and len(args) > 4 else None)
            category = self._category(group, name)
            self.seconds[category] += time.perf_counter() - started
            if name == "all_to_all_single":
                self.sent[category] += _all_to_all_bytes(args, kwargs, group)
            return out

        return timed

    def on_built(self, run) -> None:
        self._cp_group = run.groups.cp_group

    def on_phase_start(self, phase: str, step: int) -> None:
        if phase == "step":
            self._began = (time.perf_counter(), self.seconds["context"], self.seconds["other"], self.sent["context"])

    def on_phase_end(self, phase: str, step: int, record) -> None:
        if phase == "step" and self._began is not None:
            began, context, other, sent = self._began
            self.steps.append({"wall_s": time.perf_counter() - began, "context_s": self.seconds["context"] - context,
                               "other_s": self.seconds["other"] - other, "context_bytes": self.sent["context"] - sent})


class _TimedWork:
    """A point-to-point work whose ``wait`` counts for its category."""

    def __init__(self, work, timer: CommTimer, category: str):
        self.work, self.timer, self.category = work, timer, category

    def wait(self, *args, **kwargs):
        started = time.perf_counter()
        out = self.work.wait(*args, **kwargs)
        self.timer.seconds[self.category] += time.perf_counter() - started
        return out


def _p2p_bytes(ops) -> int:
    return sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op.__name__ == "isend")


def _all_to_all_bytes(args, kwargs, group) -> int:
    import torch.distributed as dist

    from parallel.flight import bytes_sent

    tensor = kwargs.get("input", args[1] if len(args) > 1 else None)
    return bytes_sent("all_to_all_single", tensor.numel() * tensor.element_size(), dist.get_world_size(group))


def worker(args) -> None:
    import torch.distributed as dist

    from bench.memory import MemoryObserver, PhasePeaks, SavedActivations
    from training import run
    from training.config import load

    timer = CommTimer().install()
    peaks, activations = PhasePeaks(), SavedActivations()
    run(load(args.config, args.set), observers=[MemoryObserver(peaks, activations), timer])
    peaks.end()
    record = {"rank": dist.get_rank(), "runtime_bytes": peaks.runtime, "activation_bytes": activations.peak,
              "peak_above_runtime": max(peaks.peaks[p] for p in ("load", "steps", "optimizer") if p in peaks.peaks)
              - peaks.runtime, "steps": timer.steps}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    if dist.get_rank() == 0:
        Path(args.out_file).write_text(json.dumps(gathered))


# --- in the command ----------------------------------------------------------------------------------------------
def summarize(ranks: list[dict], context: int, seq_len: int) -> dict:
    """One probe: the largest rank's peak above its runtime, activations and runtime; the median over the steps
    after the first of the step time (the slowest rank's), tokens/s, and the context collectives' seconds
    (the rank that spent longest in them), share of the step and bytes sent."""
    steps = len(ranks[0]["steps"])
    timed = range(1, steps) if steps > 1 else range(steps)

    def median(key: str, pick=max) -> float:
        return statistics.median(pick(r["steps"][i][key] for r in ranks) for i in timed)

    step_s, context_s = median("wall_s"), median("context_s")
    return {"context": context, "seq_len": seq_len, "ok": True,
            "peak_bytes": max(r["peak_above_runtime"] for r in ranks),
            "runtime_bytes": max(r["runtime_bytes"] for r in ranks),
            "activation_bytes": max(r["activation_bytes"] for r in ranks), "step_s": step_s,
            "tokens_per_s": seq_len / step_s, "context_comm_s": context_s, "comm_share": context_s / step_s,
            "other_comm_s": median("other_s"), "context_bytes": median("context_bytes")}


def probe(args, context: int, seq_len: int, scratch: Path) -> dict:
    """Train ``--steps`` steps at ``context`` ranks and ``seq_len`` tokens; ``summarize`` of its ranks, or the
    failure's first error."""
    from bench.launch import first_error, torchrun

    where = Path(tempfile.mkdtemp(prefix=f"n{context}-s{seq_len}-", dir=scratch))  # a probe may be repeated
    out_file = where / "ranks.json"
    sets = [*(QUICK_MODEL if args.quick else MODEL), *COMMON, f"parallel.context={context}",
            f"data.seq_len={seq_len}", f"train.steps={args.steps}", f"train.output_dir={where / 'run'}"]
    print(f"{PROG}: N={context} seq_len={seq_len}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = torchrun("bench.context", context, ["--worker", "--config", CONFIG, "--out-file", str(out_file)],
                    sets=sets, port=29800 + context, threads=1, timeout=args.timeout,
                    env={"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
    if proc.returncode != 0 or not out_file.is_file():
        return {"context": context, "seq_len": seq_len, "ok": False, "wall_s": time.perf_counter() - started,
                "error": first_error(proc.stdout + "\n" + proc.stderr)}
    row = summarize(json.loads(out_file.read_text()), context, seq_len)
    return {**row, "wall_s": time.perf_counter() - started}


def planned(args, context: int, seq_len: int) -> dict:
    """``bench plan``'s peak and activations for the probe's run, and the formula's context bytes per step."""
    from bench.formulas import context_attention_bytes, decoder_shape
    from bench.plan_stages import plan_layout, plan_row
    from bench.plan_trace import full_meta_model
    from modeling.context import choose_method
    from training.config import load

    cfg = load(CONFIG, [*(QUICK_MODEL if args.quick else MODEL), *COMMON, f"parallel.context={context}",
                        f"data.seq_len={seq_len}", "train.output_dir=unused"])
    full = full_meta_model(cfg)
    row = plan_row(f"context={context}", cfg, context, plan_layout(cfg, context, full, device="cpu"))
    shape = decoder_shape(full.config)
    method = choose_method("auto", shape.heads, shape.kv_heads, context)
    sent = context_attention_bytes(method, 1, seq_len, shape.heads, shape.kv_heads, shape.head_dim, context)
    return {"planned_peak_bytes": row["peak_bytes"], "planned_activation_bytes": row["activation_bytes"],
            "method": method if context > 1 else "-",
            "formula_context_bytes": shape.layers * (sent["forward"] + sent["backward"])}


def search_longest(args, context: int, start: int, scratch: Path) -> dict:
    """The longest sequence at ``context`` ranks within ``--budget`` (``bench.context_search.longest``), with
    every probe and the longest one's measurements."""
    from bench.context_search import longest, quantum

    probes: dict[int, dict] = {}

    def run_probe(seq_len: int) -> tuple[float, bool]:
        probes[seq_len] = probe(args, context, seq_len, scratch)
        row = probes[seq_len]
        return (row["peak_bytes"] if row["ok"] else float("inf")), row["ok"]

    best, trials = longest(run_probe, args.budget, quantum(context), start, args.max_seq, args.max_probes)
    return {"context": context, "longest": best, "budget_bytes": args.budget,
            "trials": [probes[t.seq_len] | {"fits": t.fits} for t in trials], "at_longest": probes.get(best)}


def run_fixed(args, scratch: Path) -> list[dict]:
    rows = []
    for n in args.contexts:
        row = probe(args, n, args.fixed_seq, scratch)
        row.update(planned(args, n, args.fixed_seq))
        if row["ok"]:
            row["plan_error"] = row["planned_peak_bytes"] / row["peak_bytes"] - 1
            row["context_bytes_vs_formula"] = (row["context_bytes"] / row["formula_context_bytes"]
                                               if row["formula_context_bytes"] else None)
        rows.append(row)
    return rows


def run_longest(args, scratch: Path) -> list[dict]:
    """Every N in turn; each search after the first starts at 0.9 x the previous one's longest per rank."""
    from bench.context_search import quantum

    rows, start = [], args.start
    for n in args.contexts:
        rows.append(search_longest(args, n, start, scratch))
        if rows[-1]["longest"]:
            next_n = args.contexts[len(rows)] if len(rows) < len(args.contexts) else n
            start = max(quantum(next_n), int(0.9 * rows[-1]["longest"] * next_n / n))
    return rows


def parse_args(argv) -> argparse.Namespace:
    from bench.cli import RESULTS
    from bench.plan import parse_bytes

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="1,2,4", help="the context-parallel degrees N (comma-separated)")
    parser.add_argument("--parts", default="fixed,longest", help="fixed, longest (comma-separated)")
    parser.add_argument("--budget", default="256MiB", help="memory per rank above its runtime (e.g. 256MiB)")
    parser.add_argument("--fixed-seq", type=int, default=8192, help="the fixed part's sequence length")
    parser.add_argument("--steps", type=int, default=2, help="training steps per probe (at least 2: the first "
                        "one is not timed)")
    parser.add_argument("--start", type=int, default=2048, help="N=1's first probe (later N start from the "
                        "previous one's longest)")
    parser.add_argument("--max-seq", type=int, default=LIMIT, help="the longest length probed")
    parser.add_argument("--max-probes", type=int, default=8, help="probes per N at most")
    parser.add_argument("--quick", action="store_true", help="a tiny Llama (2 x 64), for tests")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per probe")
    parser.add_argument("--scratch", help="where the runs go (removed at the end); default: a temporary directory")
    parser.add_argument("--out", default=str(RESULTS / "context"), help="results.json, report.md, longest.png")
    parser.add_argument("--config", default=CONFIG, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if not args.worker:
        check_args(args, parse_bytes)
    return args


def check_args(args, parse_bytes) -> None:
    """Every number and list before anything is launched; a bad one is one line and exit code 2."""
    from bench.cli import fail

    try:
        args.contexts = [int(x) for x in args.contexts.split(",") if x.strip()]
    except ValueError:
        fail(PROG, f"--contexts {args.contexts!r}: comma-separated whole numbers, e.g. 1,2,4")
    if not args.contexts or min(args.contexts) < 1 or len(set(args.contexts)) != len(args.contexts):
        fail(PROG, f"--contexts {','.join(map(str, args.contexts))}: distinct degrees of at least 1, e.g. 1,2,4")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in ("fixed", "longest")]
    if unknown or not parts:
        fail(PROG, f"--parts {args.parts!r}: unknown {', '.join(unknown) or 'nothing'}; choose from fixed, longest")
    args.parts = parts
    try:
        args.budget = parse_bytes(args.budget)
    except ValueError:
        fail(PROG, f"--budget {args.budget!r}: a size such as 256MiB or 2GB")
    if args.budget <= 0:
        fail(PROG, f"--budget {args.budget}: must be positive")
    for flag, least in (("steps", 2), ("start", 1), ("max_probes", 1), ("timeout", 1)):
        if getattr(args, flag) < least:
            fail(PROG, f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least {least}")
    split = 2 * max(args.contexts)
    if args.fixed_seq < split or args.fixed_seq % split:
        fail(PROG, f"--fixed-seq {args.fixed_seq}: must be a positive multiple of 2 x the largest N ({split})")
    if not 0 < args.max_seq <= LIMIT:
        fail(PROG, f"--max-seq {args.max_seq}: between 1 and the model's {LIMIT} positions")


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if ran_as_worker(args, worker):
        return None
    import shutil

    from bench.context_report import plot, report
    from bench.context_search import bars
    from bench.machine import describe, publish

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-context-", dir=args.scratch))
    started = time.perf_counter()
    try:
        fixed = run_fixed(args, scratch) if "fixed" in args.parts else []
        longest_rows = run_longest(args, scratch) if "longest" in args.parts else []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # made by mkdtemp above: ours alone
    model = ("Llama 2 x 64 (quick)" if args.quick else "Llama from scratch: hidden 256, MLP 688, 4 layers, 8 heads, 4 "
             "key/value heads (head_dim 32), byte tokenizer, fp32, sdpa, ZeRO-1, micro-batch 1, one thread per rank, "
             f"{args.steps} steps per probe.")
    result = {"machine": describe(), "command": f"{PROG} " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "model": model, "fixed_seq": args.fixed_seq, "budget_bytes": args.budget, "fixed": fixed,
              "longest": longest_rows, "wall_s": time.perf_counter() - started}
    result["bars"] = bars({r["context"]: r["longest"] for r in longest_rows},
                          {r["context"]: r["activation_bytes"] for r in fixed if r["ok"]})
    publish(result, report(result), str(out))
    plot(result, out / "longest.png")
    return result


if __name__ == "__main__":
    main()
