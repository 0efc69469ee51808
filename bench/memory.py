"""Memory per rank, phase by phase, next to the model-state formula of the layout.

    python -m bench memory --config configs/memory_gpt2.yaml --out bench/results/memory-cpu \\
        --layout tensor=1 --layout tensor=2 --layout pipeline=2 --layout tensor=2,pipeline=2 \\
        --layout data=2,zero=3

Each variant (``--layout``: a parallel layout and ZeRO stage) trains for real under torchrun (``train.steps``
steps, then the end-of-run save and export the config asks for). Every rank measures its own peak memory in each
phase (``PhasePeaks``), the phases told by the run's events (``MemoryObserver``, a ``training.events.Observer``):
``runtime`` (before the model exists: interpreter, torch, DeepSpeed, data), ``load`` (model construction and the
DeepSpeed engine), ``resume`` (a resumed run's restore: the optimizer state written into DeepSpeed's partitions),
``steps`` (forward and backward passes, eval), ``optimizer`` (the run's optimizer phase, DeepSpeed's
``engine.step``: gradient reduction at the boundary, clipping, AdamW), ``save`` (the checkpoint), ``export``
(``output_dir/hf``). On CPU the peak is anonymous resident memory (what the process allocated; pages of
memory-mapped safetensors files are page cache the kernel can drop, and are in results.json's ``rss`` peaks
only). The formula is the ZeRO paper's model state per rank for this rank's parameters (routed experts under
expert parallelism partitioned over their own data-parallel group: ``bench.formulas.expert_layout_state_bytes``),
at the run's precision: bf16/fp16 runs get the mixed-precision terms
``bench plan`` uses; results written before 2026-12-06 used the fp32 terms whatever the precision): weights,
gradients, AdamW moments and, under ZeRO, the fp32 master
partition and, under ZeRO-3, the largest layer gathered in full with its gradient (DeepSpeed's own estimate), plus
the activations, measured (``SavedActivations``: the most bytes of tensors autograd held for the backward at once
during the steps) and, of those, the most one transformer block saved (``layer_bytes``: from the start of the
rank's first block to the start of its second, ``bench.plan_layers.BlockWindow``; ``bench plan --check`` sets the
traced per-layer bytes against it). CPU ranks holding >= 256 MiB of parameters fix glibc's mmap threshold at
256 KB themselves (``training/host_memory.py``; ``--malloc-mmap-threshold N`` passes ``MALLOC_MMAP_THRESHOLD_=N``
instead), so that resident memory follows the live tensors: with glibc's default, memory of freed tensors under
32 MB stays in the heap and a phase's peak carries the previous phase's high-water mark. For the save and export
phases the report also gives what the phase itself added above what the rank held when it began (``+added``), and
the slowest rank's save time.
Outputs in ``--out``: results.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.cli import RESULTS
from bench.formulas import expert_layout_state_bytes, largest_layer_params
from bench.variant import Variant, parse_variant
from training.events import Observer

PHASES = ("load", "resume", "steps", "optimizer", "save", "export")
MMAP_THRESHOLD = 256 * 1024


class PhasePeaks:
    """This process's peak memory per phase. CPU: anonymous resident memory (``RssAnon``: what the process
    allocated, which the kernel cannot drop), sampled every millisecond by a thread while a phase runs, and the
    kernel's resident high-water mark (``VmHWM``, reset at each phase's start through ``/proc/self/clear_refs``),
    which also counts the pages of memory-mapped files (safetensors reads) that the kernel can reclaim.
    GPU: ``torch.cuda`` peak allocated memory, for both."""

    def __init__(self, interval_s: float = 0.001):
        self.peaks: dict[str, int] = {}
        self.rss_peaks: dict[str, int] = {}
        self.seconds: dict[str, float] = {}  # wall time spent in each phase
        self.added: dict[str, int] = {}  # the phase's own peak: above what was held when it began
        self._began = 0.0
        self._at_start = 0
        self.runtime = 0
        self.current: str | None = None
        self.interval_s = interval_s
        self._sampled = 0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    @staticmethod
    def _on_gpu() -> bool:
        import torch

        return torch.cuda.is_available()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sampled = max(self._sampled, self._status("RssAnon"))

    def start(self, phase: str) -> None:
        self.end()
        import torch

        if self._on_gpu():
            self.runtime = self.runtime or torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self._at_start = torch.cuda.memory_allocated()
        else:
            self.runtime = self.runtime or self._status("RssAnon")
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
            self._sampled = self._at_start = self._status("RssAnon")
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self.current = phase
        self._began = time.perf_counter()

    def end(self) -> None:
        if self.current is None:
            return
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + time.perf_counter() - self._began
        if self._on_gpu():
            import torch

            peak = rss_peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak, rss_peak = max(self._sampled, self._status("RssAnon")), self._status("VmHWM")
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak)
        self.added[self.current] = max(self.added.get(self.current, 0), peak - self._at_start)
        self.rss_peaks[self.current] = max(self.rss_peaks.get(self.current, 0), rss_peak)
        self.current = None


class SavedActivations:
    """The activations of the steps: bytes of the tensors autograd keeps for the backward, live at once, at
    their peak (``torch.autograd.graph.saved_tensors_hooks``). A storage counts once however many tensors
    view it; parameters (and views of them) are not activations. Under pipelines the micro-batches in flight
    add up by themselves. A saved tensor counts from its forward until the backward unpacks it."""

    def __init__(self):
        self._refs: dict[int, int] = {}
        self._bytes: dict[int, int] = {}
        self._parameter_storages: set[int] = set()
        self.live = 0
        self.peak = 0

    def _is_parameter(self, tensor) -> bool:
        import torch

        return (isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter)
                or tensor.untyped_storage().data_ptr() in self._parameter_storages)

    def pack(self, tensor):
        if tensor.device.type == "meta" or self._is_parameter(tensor):
            return tensor, None
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if not self._refs.get(key):
            self._bytes[key] = storage.nbytes()
            self.live += self._bytes[key]
            self.peak = max(self.peak, self.live)
        self._refs[key] = self._refs.get(key, 0) + 1
        return tensor, key

    def unpack(self, packed):
        tensor, key = packed
        if key is not None and self._refs.get(key):
            self._refs[key] -= 1
            if not self._refs[key]:
                self.live -= self._bytes.pop(key)
                del self._refs[key]
        return tensor

    def reset(self, module) -> None:
        """A new step of ``module``: what an earlier step saved and never unpacked is gone with its graph.
        Its parameters' storages are noted now: DeepSpeed keeps them as views of flat buffers, which views
        of the weights that a layer saves share."""
        self._refs.clear()
        self._bytes.clear()
        self.live = 0
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}


class MemoryObserver(Observer):
    """``PhasePeaks`` and ``SavedActivations`` driven by the run's events: ``load``, ``resume``, ``save`` and
    ``export`` are their own phases; ``steps`` runs from a step's (or an evaluation's) start to the next of
    those, less each ``optimizer`` phase (DeepSpeed's ``engine.step``); autograd's saved tensors are counted
    inside every ``step``."""

    OWN = ("load", "resume", "save", "export")

    def __init__(self, peaks: PhasePeaks, activations: SavedActivations):
        self.peaks, self.activations = peaks, activations
        self._module = None
        self._hooks = None
        self.window = None

    def on_built(self, built) -> None:
        self._module = built.engine.module
        self.window = _block_window(getattr(built, "model", None), self.activations)

    @property
    def layer_bytes(self) -> int:
        """The most bytes one transformer block saved for the backward (``bench.plan_layers.BlockWindow``: from
        the start of this rank's first block to the start of its second), 0 where it has fewer than two."""
        return self.window.bytes if self.window is not None else 0

    def on_phase_start(self, phase: str, step: int) -> None:
        if phase in self.OWN or phase == "optimizer":
            self.peaks.start(phase)
        elif phase in ("step", "eval") and self.peaks.current != "steps":
            self.peaks.start("steps")
        if phase == "step":
            import torch

            self.activations.reset(self._module)
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self.activations.pack, self.activations.unpack)
            self._hooks.__enter__()

    def on_phase_end(self, phase: str, step: int, record) -> None:
        if phase in self.OWN:
            self.peaks.end()
        elif phase == "optimizer":
            self.peaks.start("steps")
        elif phase == "step" and self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None


def _block_window(model, activations):
    """A ``BlockWindow`` over the first consecutive blocks of ``model`` that this rank holds (with pipelines,
    the blocks of its stage), or None."""
    from bench.plan_layers import BlockWindow
    from modeling.pipeline import blocks_of

    try:
        blocks = blocks_of(model)
    except (TypeError, ValueError, AttributeError):  # an encoder-decoder, a model without a block list
        return None
    held = [i for i, block in enumerate(blocks) if any(p.device.type != "meta" for p in block.parameters())]
    first = next((i for i in held if i + 1 in held), None)
    if first is None:
        return None
    last = first + 1 + (first + 2 in held)
    return BlockWindow(list(blocks[first:last + 1]), activations)


def worker(args) -> None:
    import torch.distributed as dist

    from training import run
    from training.config import load
    from training.lifecycle import finish_process

    cfg = load(args.config, args.set)
    peaks, activations = PhasePeaks(), SavedActivations()
    observer = MemoryObserver(peaks, activations)
    result = run(cfg, observers=[observer])
    peaks.end()
    module = result.engine.module
    # unpartitioned (ZeRO-3 keeps the size in ds_numel); the formula divides by the data-parallel degree
    local = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    dp = dist.get_world_size() // (cfg.parallel.tensor * cfg.parallel.pipeline)
    experts = sum(p.numel() for p in module.parameters() if hasattr(p, "expert_range"))
    formula = expert_layout_state_bytes(local, cfg.parallel.zero_stage, dp, largest_layer_params(module),
                                        cfg.precision, experts, cfg.parallel.expert)
    formula["activation_bytes"] = activations.peak
    record = {"rank": dist.get_rank(), "runtime_bytes": peaks.runtime, "local_params": local,
              "malloc_mmap_threshold": _mmap_threshold(result.model),
              "formula_bytes": sum(formula.values()), "activation_bytes": activations.peak,
              "layer_bytes": observer.layer_bytes,
              **{f"{k}_peak_bytes": v for k, v in peaks.peaks.items()},
              **{f"{k}_rss_peak_bytes": v for k, v in peaks.rss_peaks.items()},
              **{f"{k}_seconds": v for k, v in peaks.seconds.items()},
              **{f"{k}_added_bytes": v for k, v in peaks.added.items()}}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    if dist.get_rank() == 0:
        Path(args.out_file).write_text(json.dumps(gathered))
    finish_process()


def _mmap_threshold(model) -> str | None:
    """glibc's mmap threshold this rank ran with: the user's variable, or the one colonnade set on a CPU rank
    holding a large share of the model; None: glibc's dynamic default."""
    from deepspeed.accelerator import get_accelerator

    from training import host_memory

    applied = host_memory.applies(get_accelerator().device_name(), host_memory.held_bytes(model))
    return os.environ.get("MALLOC_MMAP_THRESHOLD_") or (str(host_memory.MMAP_THRESHOLD) if applied else None)


def run_variant(args, label: str, sets: list[str], nproc: int, work: Path, index: int) -> dict:
    """Train one variant (``--layout``) under torchrun with its run (checkpoints, export) in ``work/run{index}``."""
    out_file, run = work / f"layout{index}.json", work / f"run{index}"
    if run.exists():  # an earlier bench run's: a new run there would be refused (or resume it)
        from bench.cli import fail
        from training.run_dir import RUN_MARKER

        if not (run / RUN_MARKER).is_file():
            fail("bench memory", f"--work {work}: {run} exists and is not a run of ours (no {RUN_MARKER}); "
                                 f"choose another --work")
        shutil.rmtree(run)
    sets = sets + [f"train.output_dir={run}", "train.progress=false"]
    from bench.launch import torchrun

    env = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else None
    proc = torchrun("bench.memory", nproc, ["--worker", "--config", args.config, "--out-file", str(out_file)],
                    sets=args.set + sets, port=29700 + index, timeout=args.timeout, env=env)
    if proc.returncode != 0 or not out_file.is_file():
        return {"layout": label, "nproc": nproc, "status": "failed", "log_tail": (proc.stderr or "")[-3000:]}
    return {"layout": label, "nproc": nproc, "status": "ok", "ranks": json.loads(out_file.read_text())}


def summarize(record: dict) -> dict:
    """Per phase: the largest rank's peak above its runtime, and the largest such peak over its formula."""
    ranks = record["ranks"]
    row = {"layout": record["layout"], "nproc": record["nproc"],
           "params_per_rank": max(r["local_params"] for r in ranks),
           "formula_bytes": max(r["formula_bytes"] for r in ranks),
           "activation_bytes": max(r.get("activation_bytes", 0) for r in ranks),
           "layer_bytes": max(r.get("layer_bytes", 0) for r in ranks),
           "runtime_bytes": max(r["runtime_bytes"] for r in ranks)}
    for phase in PHASES:
        above = [(r[f"{phase}_peak_bytes"] - r["runtime_bytes"], r["formula_bytes"]) for r in ranks
                 if f"{phase}_peak_bytes" in r]
        if above:
            row[f"{phase}_above_runtime_bytes"] = max(a for a, _ in above)
            row[f"{phase}_vs_formula"] = max(a / f for a, f in above)
            row[f"{phase}_rss_peak_bytes"] = max(r[f"{phase}_rss_peak_bytes"] for r in ranks)
            row[f"{phase}_seconds"] = max(r.get(f"{phase}_seconds", 0.0) for r in ranks)
            row[f"{phase}_added_bytes"] = max(r.get(f"{phase}_added_bytes", 0) for r in ranks)
    return row


def report(rows: list[dict], machine: dict, command: str, threshold: int) -> str:
    mb = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    head = (["layout", "ranks", "params/rank", "formula MB", "activations MB", "per-layer MB", "runtime MB"]
            + [f"{p} MB (x formula)" for p in PHASES] + ["save s"])
    lines = [f"# Memory per rank ({machine['date']}, {machine['cpu']}, {machine['cores']} cores, torch "
             f"{machine['torch']})", "", f"`{command}`", "",
             "Peak anonymous memory above the runtime, largest rank; in brackets the largest ratio of a rank's "
             "peak above its runtime to its formula: model state (weights + gradients + AdamW moments under its "
             "ZeRO stage, plus the fp32 master partition DeepSpeed keeps under ZeRO and, under ZeRO-3, the largest "
             "layer gathered with its gradient) + activations (the most bytes autograd held for the backward at "
             "once, measured; their own column); per-layer: the most bytes one transformer block saved "
             "(bench/plan_layers.py, from the start of the rank's first block to the start of its second); resume: "
             "a resumed run's restore of the optimizer state; +N: what "
             "the resume, optimizer step, save or export added above what the rank held when it began. save s: the "
             "slowest rank's wall time in the checkpoint saves. "
             + (f"Ranks ran with MALLOC_MMAP_THRESHOLD_={threshold} (freed tensors go back to the system)."
                if threshold else "Ranks ran without MALLOC_MMAP_THRESHOLD_: CPU ranks holding >= 256 MiB of "
                "parameters set glibc's mmap threshold to 256 KB themselves (training/host_memory.py; freed tensors "
                "go back to the system), smaller ones keep glibc's default."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "formula_bytes" not in r:
            lines.append(f"| {r['layout']} | {r['nproc']} | failed |")
            continue
        cells = [r["layout"], str(r["nproc"]), f"{r['params_per_rank'] / 1e6:.1f} M", mb(r["formula_bytes"]),
                 mb(r["activation_bytes"]), f"{r['layer_bytes'] / 2**20:,.2f}" if r.get("layer_bytes") else "-",
                 mb(r["runtime_bytes"])]
        cells += [f"{mb(r[f'{p}_above_runtime_bytes'])} ({r[f'{p}_vs_formula']:.2f})"
                  + (f" +{mb(r[f'{p}_added_bytes'])}" if p in ("resume", "optimizer", "save", "export") else "")
                  if f"{p}_vs_formula" in r else "-" for p in PHASES]
        cells.append(f"{r['save_seconds']:.2f}" if "save_seconds" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    parser.add_argument("--layout", action="append", default=[],
                        help="tensor=N,pipeline=N,data=N,context=N,zero=N (repeatable; default: the config's own, "
                        "1 process)")
    parser.add_argument("--out", default=str(RESULTS / "memory"), help="where results.json and report.md go "
                        "(default: this repository's bench/results/memory, whatever the current directory)")
    parser.add_argument("--work", help="where the runs (checkpoints, exports) go and stay; default: a temporary "
                        "directory, removed at the end")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=0, help="glibc's "
                        "MALLOC_MMAP_THRESHOLD_ for the ranks (bytes), which colonnade then leaves alone; 0 (the "
                        "default): none, and CPU ranks holding >= 256 MiB of parameters set 256 KB themselves "
                        "(training/host_memory.py): blocks "
                        "above it are returned to the system when freed, so that resident memory follows the live "
                        "tensors, as peak allocated memory does on a GPU")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    from bench.cli import check_config
    from bench.machine import describe

    variants: list[Variant] = [parse_variant(text) for text in args.layout or [""]]
    for label, sets, nproc in variants:  # every variant's config as train.py would check it, before any launch
        check_config("bench memory" + (f" --layout {label}" if label else ""), args.config, args.set + sets, nproc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench memory: results.json and report.md go to {out.resolve()}", file=sys.stderr)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        records = [run_variant(args, *variant, work, i) for i, variant in enumerate(variants)]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)  # made by mkdtemp above: ours alone
    rows = [summarize(r) if r["status"] == "ok" else r for r in records]
    machine = describe()
    # quoted: ``bench plan --check`` reads the config and overrides back (an override may hold spaces)
    command = "python -m bench memory " + shlex.join(argv if argv is not None else sys.argv[1:])
    (out / "results.json").write_text(json.dumps({"machine": machine, "command": command, "rows": rows,
                                                  "ranks": records}, indent=1))
    (out / "report.md").write_text(report(rows, machine, command, args.malloc_mmap_threshold))
    print(report(rows, machine, command, args.malloc_mmap_threshold))
    for r in rows:
        if r.get("status") == "failed":
            print(f"layout {r['layout']} failed:\n{r['log_tail']}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
