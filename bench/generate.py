"""Distributed generation (``training.generate``): latency, throughput and each rank's memory at several
tensor x pipeline layouts, against Hugging Face's ``generate`` in one process (issue 34).

    python -m bench generate --out bench/results/generate-cpu
    python -m bench generate --model runs/quickstart --requests 16 --layouts 1x1,2x1 --int8-layouts ''

Requests: ``--requests`` prompts cut from ``--text`` (default the standard library's own source) at offsets drawn
from ``--seed``, each as long as a number of tokens drawn uniformly between half and all of ``--prompt-tokens``.
Every request decodes exactly ``--max-new-tokens`` greedy tokens (stop tokens off, as serving benchmarks'
ignore-eos: every layout does the same work, and the caches' sizes follow from the shapes). Without ``--model``
the model is a random-init GPT-2 of 12 layers x 768 (86 M parameters, fp32, the 260-token byte-level tokenizer).

A layout ``TxP`` is tensor x pipeline on T*P ranks (one replica), each rank 1 thread (``OMP_NUM_THREADS=1``). It
is loaded once, warmed up by a 2-token decode of a few requests, then decodes every request ``--repeats`` times;
the fastest repeat is reported (all are in result.json). TTFT: the mean over requests of the first token's time
from the schedule's start; TPOT: the mean over requests of (last - first token's time) / (tokens - 1);
tokens/s: all new tokens / the slowest rank's decode time (prefill included). Per rank: the bytes of the weights
it holds (its model, or its pipeline chunk: ``modeling.quantize.weight_bytes`` of the parameters and persistent
buffers that have values, shared storage once) and its peak KV-cache bytes, next to the formula

    cache bytes of a rank = sum over the layers of its stage and the batches in flight of
        2 (K and V) x rows x kv_heads / TP x head_dim x cached length x bytes per element
    cached length = the batch's prompt width + max_new_tokens - 1 (at most sliding_window - 1 on a sliding layer)

(prompts are left-padded to their batch's width; the last token chosen is never fed back). The batches are the
requests in order, cut into ``batches`` (default: one per pipeline stage) of equal size.

Beside the layouts: Hugging Face's ``model.generate`` on the same prompts as one left-padded batch (greedy, the
same new tokens, eos off) at each of ``--hf-threads`` torch threads, its TTFT the time of a ``max_new_tokens=1``
generate; pipelined decoding at ``--pipelining`` (batches=2 against batches=1 on the same requests, and the
same two batch sizes on one process as a control); weight-only int8 (``--int8-layouts``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.launch import add_worker_arguments, ran_as_worker

PROG = "python -m bench generate"
WARMUP_TOKENS = 2


# --- the workers: one torchrun launch per world size ---------------------------------------------------------
def held_weight_bytes(module) -> int:
    """``weight_bytes`` of the parameters and persistent buffers of ``module`` that hold values: the tensors a
    pipeline split leaves on the meta device are not this rank's."""
    from torch import nn

    from modeling.quantize import weight_bytes

    holder, seen = nn.Module(), set()
    for sub in module.modules():
        tensors = [p for p in sub._parameters.values() if p is not None]
        tensors += [b for name, b in sub._buffers.items()
                    if b is not None and name not in sub._non_persistent_buffers_set]
        for tensor in tensors:
            if tensor.device.type != "meta" and id(tensor) not in seen:
                seen.add(id(tensor))
                holder.register_buffer(f"t{len(seen)}", tensor.detach())
    return weight_bytes(holder)


def _measure(run: dict, plan: dict) -> list[dict]:
    """Load ``run``'s layout, warm up, and decode every request ``repeats`` times at each of its batch counts."""
    import torch.distributed as dist

    from parallel.sampling import Decoding
    from training.generate import GenerateOptions, decode, load

    prompts = plan["prompts"]
    base = GenerateOptions(plan["model"], run["tensor"], run["pipeline"], Decoding(), plan["max_new_tokens"],
                           stop=(), int8=run["int8"])
    loaded = load(base)
    module = loaded.stage.chunk if run["pipeline"] > 1 else loaded.model
    weights: list = [None] * dist.get_world_size()
    dist.all_gather_object(weights, held_weight_bytes(module))
    for batches in run["batches"]:
        decode(loaded, prompts[:2 * batches], replace(base, batches=batches, max_new_tokens=WARMUP_TOKENS))
    records = []
    for repeat in range(plan["repeats"]):
        for batches in run["batches"]:
            decoded = decode(loaded, prompts, replace(base, batches=batches))
            records.append({**run, "batches": batches, "repeat": repeat, "weight_bytes": weights,
                            "ranks": decoded.ranks, "outputs": [[o.request, o.tokens, o.first_token_s, o.last_token_s]
                                                                for o in decoded.outputs]})
    return records


def worker(args) -> None:
    import torch.distributed as dist

    from training.lifecycle import init_distributed

    init_distributed()
    plan = json.loads(Path(args.plan_file).read_text())
    records = [record for run in plan["runs"] for record in _measure(run, plan)]
    if dist.get_rank() == 0:
        Path(args.out_file).write_text(json.dumps(records))


# --- the inputs ------------------------------------------------------------------------------------------------
def build_default_model(directory: Path) -> str:
    """A random-init GPT-2, 12 layers x 768, 12 heads, fp32, with the byte-level tokenizer, saved to ``directory``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling.build import byte_level_tokenizer

    tok = byte_level_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def make_prompts(tokenizer, text: str, requests: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    """``requests`` token-id prompts cut from ``text`` at seeded offsets, each of a length drawn uniformly from
    [ceil(prompt_tokens / 2), prompt_tokens]."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(requests):
        length = rng.randint((prompt_tokens + 1) // 2, prompt_tokens)
        span = 8 * length + 64
        start = rng.randrange(max(1, len(text) - span))
        ids = tokenizer(text[start:start + span], add_special_tokens=False)["input_ids"][:length]
        if len(ids) < length:
            raise ValueError(f"--text: too short for {length}-token prompts")
        prompts.append(ids)
    return prompts


def parse_layouts(value: str, option: str) -> list[tuple[int, int]]:
    """'1x1,2x1' -> [(1, 1), (2, 1)] (tensor x pipeline); '' -> []."""
    from bench.cli import fail

    layouts = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            fail(PROG, f"{option} {value!r}: {item!r} is not TxP (tensor x pipeline, e.g. 2x1 or 1x2)")
        layouts.append((int(parts[0]), int(parts[1])))
    return layouts


def batch_shapes(prompts: list[list[int]], batches: int) -> list[tuple[int, int]]:
    """(rows, prompt width) of each batch ``training.generate`` makes: the requests in order, in ``batches``
    batches of ceil(requests / batches)."""
    size = max(1, -(-len(prompts) // batches))
    return [(len(chunk), max(len(p) for p in chunk))
            for chunk in (prompts[i:i + size] for i in range(0, len(prompts), size))]


def cache_formula(config, tensor: int, pipeline: int, pp_rank: int, shapes: list[tuple[int, int]],
                  new_tokens: int, element_bytes: int = 4) -> int:
    """The KV-cache bytes a rank holds with every batch of ``shapes`` at its full length (module docstring)."""
    from parallel.partition import stage_specs

    config = config.get_text_config(decoder=True)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or (
        ["sliding_attention" if window is not None else "full_attention"] * layers)
    total = 0
    for layer in stage_specs(layers, pipeline)[pp_rank].blocks:
        for rows, width in shapes:
            length = width + new_tokens - 1
            if types[layer] == "sliding_attention":
                length = min(length, window - 1)
            total += 2 * rows * (kv_heads // tensor) * head_dim * length * element_bytes
    return total


# --- the launches and the baseline --------------------------------------------------------------------------
def _cpu_seconds() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, its steal seconds, this process's and its waited children's)."""
    own = sum(os.times()[:4])
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0, own
    hertz = os.sysconf("SC_CLK_TCK")
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]   # user nice system irq softirq
    return busy / hertz, (fields[7] if len(fields) > 7 else 0) / hertz, own


class Meter:
    """Wall time, and the CPU seconds other processes used meanwhile (the box is shared: a number measured while
    something else ran says so)."""

    def __enter__(self) -> Meter:
        self.start, self.cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        busy, steal, own = (b - a for a, b in zip(self.cpu, _cpu_seconds()))
        self.result = {"wall_s": round(time.perf_counter() - self.start, 2),
                       "others_cpu_s": round(max(0.0, busy - own), 2), "steal_s": round(steal, 2)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, plan: dict, tmp: Path) -> tuple[list[dict], dict]:
    """Run ``plan``'s runs on ``world`` ranks (1 thread each); their records and the launch's meter."""
    from bench.launch import first_error, torchrun

    plan_file, out_file = tmp / f"plan{world}.json", tmp / f"out{world}.json"
    plan_file.write_text(json.dumps(plan))
    print(f"generate: {world} rank(s): " + "; ".join(f"TP={r['tensor']} PP={r['pipeline']}"
                                                     f"{' int8' if r['int8'] else ''} batches {r['batches']}"
                                                     for r in plan["runs"]), flush=True)
    with Meter() as meter:
        proc = torchrun("bench.generate", world, ["--worker", "--plan-file", str(plan_file), "--out-file",
                                                  str(out_file)], threads=1, port=_free_port(), timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench generate: the {world}-rank launch failed: {first_error(proc.stderr)}\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(out_file.read_text()), meter.result


def _hf_generate(model, prompts: list[list[int]], pad: int, new_tokens: int) -> tuple[list[list[int]], float]:
    """HF ``generate`` on ``prompts`` as one left-padded batch, greedy, eos off: (new tokens, seconds)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=pad)
    seconds = time.perf_counter() - start
    return out[:, width:].tolist(), seconds


def hf_baseline(model_dir: str, prompts: list[list[int]], new_tokens: int, threads: int, repeats: int) -> dict:
    """Hugging Face's ``generate`` in this process at ``threads`` torch threads: the fastest of ``repeats``."""
    import torch
    from transformers import AutoModelForCausalLM

    from modeling.build import load_tokenizer

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = load_tokenizer(model_dir)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        _hf_generate(model, prompts[:2], pad, WARMUP_TOKENS)
        with Meter() as meter:
            first = min(_hf_generate(model, prompts, pad, 1)[1] for _ in range(repeats))
            runs = [_hf_generate(model, prompts, pad, new_tokens) for _ in range(repeats)]
    finally:
        torch.set_num_threads(before)
    tokens, seconds = runs[0][0], min(s for _, s in runs)
    if any(len(t) != new_tokens for t in tokens):
        raise RuntimeError("bench generate: Hugging Face's generate stopped early with eos off")
    count = sum(len(t) for t in tokens)
    return {"threads": threads, "ttft_s": first, "seconds": seconds, "seconds_all": [s for _, s in runs],
            "tokens_per_s": count / seconds, "tpot_s": (seconds - first) / max(1, new_tokens - 1),
            "tokens": tokens, "meter": meter.result}


# --- the numbers -----------------------------------------------------------------------------------------------
def label(tensor: int, pipeline: int) -> str:
    if pipeline == 1:
        return f"TP={tensor}"
    return f"PP={pipeline}" if tensor == 1 else f"TP={tensor} × PP={pipeline}"


def plan_runs(layouts: list, int8_layouts: list, pipelining: tuple[int, int] | None) -> dict[int, list[dict]]:
    """The runs of each world size: every layout at its default batches (one per stage), the int8 layouts, and
    for pipelining its layout at batches P and 1 with the control (the same tensor size at pipeline 1) at 1 and
    P. A layout is loaded once for all its batch counts."""
    runs: dict[tuple[int, int, bool], list[int]] = {}

    def add(tensor: int, pipeline: int, int8: bool, *batches: int) -> None:
        have = runs.setdefault((tensor, pipeline, int8), [])
        have += [b for b in batches if b not in have]

    for tensor, pipeline in layouts:
        add(tensor, pipeline, False, pipeline)
    for tensor, pipeline in int8_layouts:
        add(tensor, pipeline, True, pipeline)
    if pipelining is not None:
        tensor, pipeline = pipelining
        add(tensor, pipeline, False, pipeline, 1)
        add(tensor, 1, False, 1, pipeline)
    worlds: dict[int, list[dict]] = {}
    for (tensor, pipeline, int8), batches in runs.items():
        worlds.setdefault(tensor * pipeline, []).append({"tensor": tensor, "pipeline": pipeline, "int8": int8,
                                                          "batches": batches})
    return dict(sorted(worlds.items()))


def timing(record: dict) -> dict:
    """TTFT, TPOT (means over requests), tokens/s over the slowest rank's decode time, of one decode."""
    outputs = record["outputs"]
    seconds = max(r["seconds"] for r in record["ranks"])
    count = sum(len(tokens) for _, tokens, _, _ in outputs)
    per_token = [(last - first) / (len(tokens) - 1) for _, tokens, first, last in outputs if len(tokens) > 1]
    return {"seconds": seconds, "tokens": count, "tokens_per_s": count / seconds,
            "ttft_s": sum(first for _, _, first, _ in outputs) / len(outputs),
            "tpot_s": sum(per_token) / len(per_token) if per_token else None}


def fastest(records: list[dict], tensor: int, pipeline: int, int8: bool, batches: int) -> dict | None:
    """The fastest repeat of one run at one batch count, with its timing and every repeat's seconds."""
    mine = [r for r in records if (r["tensor"], r["pipeline"], r["int8"], r["batches"])
            == (tensor, pipeline, int8, batches)]
    if not mine:
        return None
    timed = [(timing(r), r) for r in mine]
    best, record = min(timed, key=lambda pair: pair[0]["seconds"])
    tokens = [o[1] for o in record["outputs"]]
    if any([o[1] for o in r["outputs"]] != tokens for _, r in timed):
        raise RuntimeError(f"bench generate: {label(tensor, pipeline)} gave other tokens in another repeat")
    return {**best, "seconds_all": [t["seconds"] for t, _ in timed], "record": record, "token_lists": tokens}


def _equal(a: list[list[int]], b: list[list[int]] | None) -> int | None:
    return None if b is None else sum(x == y for x, y in zip(a, b))


def rank_rows(run: dict, config, prompts: list[list[int]], new_tokens: int, one_process: int) -> list[dict]:
    """Per rank of a layout: weight bytes, peak cache bytes, the formula, and the cache against one process's."""
    record, tensor, pipeline = run["record"], run["record"]["tensor"], run["record"]["pipeline"]
    shapes = batch_shapes(prompts, record["batches"])
    rows = []
    for stats in sorted(record["ranks"], key=lambda r: r["rank"]):
        formula = cache_formula(config, tensor, pipeline, stats["pp_rank"], shapes, new_tokens)
        share = stats["cache_bytes"] / one_process
        rows.append({"rank": stats["rank"], "tp_rank": stats["tp_rank"], "pp_rank": stats["pp_rank"],
                     "weight_bytes": record["weight_bytes"][stats["rank"]], "cache_bytes": stats["cache_bytes"],
                     "formula_bytes": formula, "cache_vs_one_process": share, "ideal": 1 / (tensor * pipeline),
                     "ratio_to_ideal": share * tensor * pipeline})
    return rows


def layout_rows(records: list[dict], layouts: list, config, prompts: list[list[int]], new_tokens: int,
                hf_tokens: list[list[int]] | None) -> tuple[list[dict], int]:
    """One row per fp32 layout at its default batches, with its ranks; and the one-process cache bytes."""
    one = fastest(records, 1, 1, False, 1)
    one_process = one["record"]["ranks"][0]["cache_bytes"] if one else \
        cache_formula(config, 1, 1, 0, batch_shapes(prompts, 1), new_tokens)
    rows = []
    for tensor, pipeline in layouts:
        run = fastest(records, tensor, pipeline, False, pipeline)
        assert run is not None
        rows.append({"layout": label(tensor, pipeline), "tensor": tensor, "pipeline": pipeline,
                     "world": tensor * pipeline, "batches": pipeline,
                     **{k: run[k] for k in ("ttft_s", "tpot_s", "tokens_per_s", "seconds", "seconds_all", "tokens")},
                     "equal_to_hf": _equal(run["token_lists"], hf_tokens),
                     "equal_to_tp1": _equal(run["token_lists"], one["token_lists"] if one else None),
                     "ranks": rank_rows(run, config, prompts, new_tokens, one_process)})
    return rows, one_process


def pipelining_rows(records: list[dict], pipelining: tuple[int, int]) -> dict:
    """Batches P against 1 at the pipelining layout, and the same at pipeline 1 (the control)."""
    tensor, pipeline = pipelining
    out = {"layout": label(tensor, pipeline), "batches": pipeline}
    for key, (t, p) in (("pipelined", (tensor, pipeline)), ("control", (tensor, 1))):
        many, one = fastest(records, t, p, False, pipeline), fastest(records, t, p, False, 1)
        assert many is not None and one is not None
        out[key] = {"layout": label(t, p), "ratio": many["tokens_per_s"] / one["tokens_per_s"],
                    "same_tokens": many["token_lists"] == one["token_lists"],
                    **{f"{name}_batches_{b}": run[name] for b, run in ((pipeline, many), (1, one))
                       for name in ("tokens_per_s", "ttft_s", "tpot_s", "seconds", "seconds_all")}}
    return out


def int8_rows(records: list[dict], int8_layouts: list) -> list[dict]:
    """Each int8 layout next to the same layout in fp32 (both at their default batches)."""
    rows = []
    for tensor, pipeline in int8_layouts:
        for int8 in (False, True):
            run = fastest(records, tensor, pipeline, int8, pipeline)
            if run is None:
                continue
            fp32 = fastest(records, tensor, pipeline, False, pipeline)
            rows.append({"layout": label(tensor, pipeline), "tensor": tensor, "pipeline": pipeline,
                         "weights": "int8" if int8 else "fp32",
                         **{k: run[k] for k in ("ttft_s", "tpot_s", "tokens_per_s", "seconds", "seconds_all")},
                         "weight_bytes_per_rank": run["record"]["weight_bytes"],
                         "weight_bytes": sum(run["record"]["weight_bytes"]),
                         "equal_to_fp32": _equal(run["token_lists"], fp32["token_lists"] if fp32 else None)})
    return rows


def describe_model(path: str, config) -> dict:
    text = config.get_text_config(decoder=True)
    return {"path": path, "model_type": config.model_type, "layers": text.num_hidden_layers,
            "hidden": text.hidden_size, "heads": text.num_attention_heads,
            "kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            "vocab": text.vocab_size}


def summarize(records: list[dict], hf: list[dict], setup: dict) -> dict:
    """result.json: the layouts with their ranks, the HF baseline, pipelining, int8."""
    config, prompts, new_tokens = setup["config"], setup["prompts"], setup["max_new_tokens"]
    hf_tokens = hf[0]["tokens"] if hf else None
    layouts, one_process = layout_rows(records, setup["layouts"], config, prompts, new_tokens, hf_tokens)
    lengths = [len(p) for p in prompts]
    result = {"machine": setup["machine"], "command": setup["command"], "model": setup["model"],
              "requests": len(prompts), "prompt_tokens": {"min": min(lengths), "max": max(lengths),
                                                          "mean": sum(lengths) / len(lengths)},
              "max_new_tokens": new_tokens, "repeats": setup["repeats"], "threads_per_rank": 1,
              "one_process_cache_bytes": one_process, "layouts": layouts,
              "hf": [{k: v for k, v in h.items() if k != "tokens"} | {"equal_to_tp1": _equal(h["tokens"],
                      next((r["token_lists"] for r in [fastest(records, 1, 1, False, 1)] if r), None))}
                     for h in hf],
              "int8": int8_rows(records, setup["int8_layouts"]), "launches": setup["launches"],
              "meter": setup["meter"]}
    if setup["pipelining"] is not None:
        result["pipelining"] = pipelining_rows(records, setup["pipelining"])
    result["checks"] = {
        "cache_equals_formula": all(r["cache_bytes"] == r["formula_bytes"] for row in layouts for r in row["ranks"]),
        "cache_within_5_percent_of_ideal": all(abs(r["ratio_to_ideal"] - 1) <= 0.05
                                               for row in layouts for r in row["ranks"]),
        "pipelining_same_tokens": result.get("pipelining", {}).get("pipelined", {}).get("same_tokens")}
    return result


# --- the report ------------------------------------------------------------------------------------------------
def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f}"


def _bytes(value: int) -> str:
    return f"{value:,}"


def layout_table(result: dict) -> list[str]:
    n = result["requests"]
    base = next((r["tokens_per_s"] for r in result["layouts"] if r["world"] == 1), None)
    lines = ["| layout | ranks | batches in flight | TTFT (s) | TPOT (ms) | tokens/s | × TP=1 | tokens equal to HF "
             f"(of {n}) | weight bytes per rank |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["layouts"]:
        speed = f"{row['tokens_per_s'] / base:.2f}" if base else "—"
        weights = " / ".join(_bytes(r["weight_bytes"]) for r in row["ranks"])
        lines.append(f"| {row['layout']} | {row['world']} | {row['batches']} | {row['ttft_s']:.2f} | "
                     f"{_ms(row['tpot_s'])} | {row['tokens_per_s']:.1f} | {speed} | "
                     f"{'—' if row['equal_to_hf'] is None else row['equal_to_hf']} | {weights} |")
    for h in result["hf"]:
        speed = f"{h['tokens_per_s'] / base:.2f}" if base else "—"
        lines.append(f"| HF `generate`, {h['threads']} thread{'s' if h['threads'] > 1 else ''} | 1 | 1 | "
                     f"{h['ttft_s']:.2f} | {_ms(h['tpot_s'])} | {h['tokens_per_s']:.1f} | {speed} | "
                     f"{n} (TP=1: {h['equal_to_tp1']}) | — |")
    return lines


def cache_table(result: dict) -> list[str]:
    lines = ["| layout | rank (tp, pp) | peak KV-cache bytes | formula | cache / one-process cache | 1/(TP·PP) | "
             "ratio |", "|---|---|---|---|---|---|---|"]
    for row in result["layouts"]:
        for r in row["ranks"]:
            same = "= formula" if r["cache_bytes"] == r["formula_bytes"] \
                else f"{r['cache_bytes'] / r['formula_bytes']:.4f}×"
            lines.append(f"| {row['layout']} | {r['rank']} ({r['tp_rank']}, {r['pp_rank']}) | "
                         f"{_bytes(r['cache_bytes'])} | {_bytes(r['formula_bytes'])} ({same}) | "
                         f"{r['cache_vs_one_process']:.4f} | {r['ideal']:.4f} | {r['ratio_to_ideal']:.4f} |")
    return lines


def pipelining_table(result: dict) -> list[str]:
    pipe = result["pipelining"]
    b = pipe["batches"]
    lines = [f"| layout | tokens/s, batches={b} | tokens/s, batches=1 | ratio | TTFT (s) {b} / 1 | TPOT (ms) {b} / 1 | "
             "same tokens |", "|---|---|---|---|---|---|---|"]
    for key in ("pipelined", "control"):
        p = pipe[key]
        name = p["layout"] + (" (control)" if key == "control" else "")
        lines.append(f"| {name} | {p[f'tokens_per_s_batches_{b}']:.1f} | "
                     f"{p['tokens_per_s_batches_1']:.1f} | {p['ratio']:.2f}× | {p[f'ttft_s_batches_{b}']:.2f} / "
                     f"{p['ttft_s_batches_1']:.2f} | {_ms(p[f'tpot_s_batches_{b}'])} / {_ms(p['tpot_s_batches_1'])} | "
                     f"{'yes' if p['same_tokens'] else 'NO'} |")
    return lines


def int8_table(result: dict) -> list[str]:
    lines = ["| layout | weights | TTFT (s) | TPOT (ms) | tokens/s | weight bytes (all ranks) | × fp32 | "
             f"tokens equal to fp32 (of {result['requests']}) |", "|---|---|---|---|---|---|---|---|"]
    for row in result["int8"]:
        fp32 = next(r for r in result["int8"] if r["layout"] == row["layout"] and r["weights"] == "fp32") \
            if any(r["layout"] == row["layout"] and r["weights"] == "fp32" for r in result["int8"]) else None
        share = f"{row['weight_bytes'] / fp32['weight_bytes']:.3f}" if fp32 else "—"
        per_rank = f" ({' + '.join(_bytes(b) for b in row['weight_bytes_per_rank'])})" \
            if len(row["weight_bytes_per_rank"]) > 1 else ""
        lines.append(f"| {row['layout']} | {row['weights']} | {row['ttft_s']:.2f} | {_ms(row['tpot_s'])} | "
                     f"{row['tokens_per_s']:.1f} | {_bytes(row['weight_bytes'])}{per_rank} | {share} | "
                     f"{'—' if row['equal_to_fp32'] is None else row['equal_to_fp32']} |")
    return lines


FORMULA = """    cache bytes of a rank = sum over the layers of its stage and the batches in flight of
        2 (K and V) x rows x kv_heads / TP x head_dim x cached length x bytes per element
    cached length = the batch's prompt width + max_new_tokens - 1 (at most sliding_window - 1 on a sliding layer)"""


def report_header(result: dict) -> list[str]:
    m, model, prompt = result["machine"], result["model"], result["prompt_tokens"]
    meter = result["meter"]
    return [
        "# Distributed generation (`python -m bench generate`)", "",
        f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}; {m['date']} {m['start']}–{m['end']} UTC, commit {m['commit']}.", "",
        "```bash", result["command"], "```", "",
        f"Model: {model['model_type']}, {model['layers']} layers × {model['hidden']}, {model['heads']} heads "
        f"({model['kv_heads']} key/value), vocabulary {model['vocab']}, {model.get('note', model['path'])}. "
        f"{result['requests']} requests, prompts of {prompt['min']}–{prompt['max']} tokens (mean "
        f"{prompt['mean']:.1f}) cut from the standard library's source, {result['max_new_tokens']} new tokens each "
        f"(greedy, stop tokens off). Every rank runs 1 thread; each number is the fastest of {result['repeats']} "
        f"repeats after a {WARMUP_TOKENS}-token warm-up (every repeat's seconds are in result.json). The bench took "
        f"{meter['wall_s']:.0f} s; other processes used {meter['others_cpu_s']:.0f} CPU-seconds meanwhile "
        f"(steal {meter['steal_s']:.0f} s; per launch in result.json)" + _quiet(result) + ".", ""]


def _quiet(result: dict) -> str:
    """A warning when other processes took more than 5 % of the machine while the bench ran."""
    meter, cores = result["meter"], result["machine"]["cores"] or 1
    share = meter["others_cpu_s"] / max(1e-9, meter["wall_s"] * cores)
    return f": **{share:.0%} of the machine went to other processes; the timings are not clean**" \
        if share > 0.05 else ""


def report(result: dict) -> str:
    lines = report_header(result)
    lines += ["## Layouts", "", "TTFT: mean over requests of the first token's time from the schedule's start; TPOT: "
              "mean over requests of (last − first token's time) / (tokens − 1); tokens/s: all new tokens / the "
              "slowest rank's decode time, prefill included. HF `generate`: one left-padded batch in this process, "
              "TTFT the time of a `max_new_tokens=1` generate, TPOT (full − that) / (new tokens − 1). Weight bytes: "
              "what each rank holds (its model or pipeline chunk).", ""]
    lines += layout_table(result)
    lines += ["", "## KV cache per rank", "", "Peak bytes of the key/value tensors a rank held "
              "(`Decoded.ranks[i]['cache_bytes']`), against", "", "```", FORMULA, "```", "",
              f"and against the one-process cache (TP=1, one batch: {_bytes(result['one_process_cache_bytes'])} "
              "bytes); ratio = (cache / one-process cache) / (1/(TP·PP)), the must-show being within 5 % of 1.", ""]
    lines += cache_table(result)
    if "pipelining" in result:
        pipe = result["pipelining"]
        lines += ["", "## Pipelined decoding", "", f"{pipe['layout']} with {pipe['batches']} batches in flight "
                  f"against 1 on the same requests ({result['requests']} requests: {pipe['batches']} batches of "
                  f"{-(-result['requests'] // pipe['batches'])} against one of {result['requests']}); the control "
                  "runs the same two batch sizes at pipeline 1 on one process, so that the ratio it shows is what "
                  "the batch size alone does.", ""]
        lines += pipelining_table(result)
    if result["int8"]:
        lines += ["", "## Weight-only int8", "", "`GenerateOptions.int8` (`modeling.quantize`) against fp32 at the "
                  "same layout.", ""]
        lines += int8_table(result)
    lines += ["", "![tokens/s by layout; KV-cache bytes per rank against the formula](generate.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Two panels: tokens/s by layout (HF, pipelining's batches=1, int8 beside), cache bytes per rank vs formula."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(r["layout"], r["tokens_per_s"], "tab:blue") for r in result["layouts"]]
    bars += [(f"HF {h['threads']}t", h["tokens_per_s"], "tab:gray") for h in result["hf"]]
    if "pipelining" in result:
        pipe = result["pipelining"]["pipelined"]
        bars.append((f"{pipe['layout']} b=1", pipe["tokens_per_s_batches_1"], "tab:orange"))
    bars += [(f"{r['layout']} int8", r["tokens_per_s"], "tab:green") for r in result["int8"] if r["weights"] == "int8"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = left.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
    left.bar_label(drawn, fmt="%.0f", fontsize=7)
    left.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=35, ha="right")
    left.set_ylabel("new tokens / s")
    left.set_title(f"throughput ({result['requests']} requests × {result['max_new_tokens']} tokens)")
    ranks = [(f"{row['layout'].replace(' × ', '×')} rank {r['rank']}", r) for row in result["layouts"]
             for r in row["ranks"]]
    x = range(len(ranks))
    right.bar(x, [r["cache_bytes"] / 2**20 for _, r in ranks], color="tab:blue", label="measured peak")
    right.scatter(x, [r["formula_bytes"] / 2**20 for _, r in ranks], color="black", marker="_", s=400, zorder=3,
                  label="formula")
    right.scatter(x, [result["one_process_cache_bytes"] * r["ideal"] / 2**20 for _, r in ranks], color="tab:red",
                  marker="x", zorder=3, label="one process / (TP·PP)")
    right.set_xticks(list(x), [name for name, _ in ranks], fontsize=7, rotation=35, ha="right")
    right.set_ylabel("KV-cache MiB per rank")
    right.set_title("KV cache per rank")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(result: dict, out: str) -> None:
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    (directory / "README.md").write_text(report(result))
    plot(result, directory / "generate.png")


# --- the command -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF directory or colonnade checkpoint (default: a random GPT-2 12 x 768)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=48, help="the longest prompt (the shortest: half)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--layouts", default="1x1,2x1,1x2,2x2", help="tensor x pipeline, comma-separated")
    parser.add_argument("--int8-layouts", default="1x1,2x1", help="layouts also run with int8 weights ('': none)")
    parser.add_argument("--pipelining", default="1x2", help="layout whose P batches are compared with 1 ('': none)")
    parser.add_argument("--hf-threads", default="1,2", help="torch threads of the HF baseline ('': none)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", default="{stdlib}/[a-c]*.py", help="where the prompts are cut from (a glob)")
    parser.add_argument("--out", help="directory for README.md, result.json and generate.png")
    parser.add_argument("--plan-file", help=argparse.SUPPRESS)
    add_worker_arguments(parser)
    return parser.parse_args(argv)


def checked(args: argparse.Namespace) -> dict:
    """The parsed layouts and thread counts; bad input is one line and exit code 2 before anything runs."""
    from bench.cli import fail

    if args.requests < 1 or args.prompt_tokens < 2 or args.max_new_tokens < 2 or args.repeats < 1:
        fail(PROG, f"--requests {args.requests}, --prompt-tokens {args.prompt_tokens}, --max-new-tokens "
                   f"{args.max_new_tokens}, --repeats {args.repeats}: need requests >= 1, prompt and new tokens "
                   f">= 2, repeats >= 1")
    if args.model and not Path(args.model).exists():
        fail(PROG, f"--model {args.model}: no such directory")
    layouts = parse_layouts(args.layouts, "--layouts")
    if not layouts:
        fail(PROG, "--layouts: give at least one TxP layout")
    pipelining = parse_layouts(args.pipelining, "--pipelining")
    if len(pipelining) > 1 or any(p < 2 for _, p in pipelining):
        fail(PROG, f"--pipelining {args.pipelining!r}: one TxP layout with P >= 2, or ''")
    threads = [t.strip() for t in args.hf_threads.split(",") if t.strip()]
    if not all(t.isdigit() and int(t) >= 1 for t in threads):
        fail(PROG, f"--hf-threads {args.hf_threads!r}: comma-separated positive integers, or ''")
    return {"layouts": layouts, "int8_layouts": parse_layouts(args.int8_layouts, "--int8-layouts"),
            "pipelining": pipelining[0] if pipelining else None, "hf_threads": [int(t) for t in threads]}


def machine() -> dict:
    import datetime
    import subprocess

    import transformers

    from bench.machine import describe

    root = Path(__file__).resolve().parents[1]
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    commit = (git("rev-parse", "--short", "HEAD") or "unknown") + (" with uncommitted changes" if git(
        "status", "--porcelain", "--", "bench", "parallel", "modeling", "training") else "")
    now = datetime.datetime.now(datetime.timezone.utc)
    return {**describe(), "transformers": transformers.__version__, "commit": commit,
            "date": now.date().isoformat(), "start": now.strftime("%H:%M")}


def inputs(args: argparse.Namespace, tmp: Path) -> dict:
    """The model's directory, its description and config, and the prompts."""
    from transformers import AutoConfig

    from bench.cli import fail
    from modeling.build import load_tokenizer
    from training.checkpoint.files import MANIFEST
    from training.data import expand_files
    from training.generate import model_files

    path = model_files(Path(args.model)) if args.model else Path(build_default_model(tmp / "gpt2"))
    config = AutoConfig.from_pretrained(str(path))
    if config.is_encoder_decoder:
        fail(PROG, f"--model {args.model}: a decoder-only model (this one is {config.model_type})")
    try:
        files = expand_files([args.text], "--text")
    except FileNotFoundError as error:
        fail(PROG, str(error))
    text = "\n\n".join(Path(f).read_text(errors="replace") for f in files)
    prompts = make_prompts(load_tokenizer(path), text, args.requests, args.prompt_tokens, args.seed)
    model = describe_model(args.model or "built in a temporary directory", config)
    if not args.model:
        model["note"] = "random init (`GPT2Config(n_layer=12, n_embd=768, n_head=12)`, seed 0, fp32, byte-level " \
                        "tokenizer), built in a temporary directory"
    return {"path": str(path), "config": config, "prompts": prompts, "model": model,
            "hf_ok": not (path / MANIFEST).is_file()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if ran_as_worker(args, worker):
        return {}
    options = checked(args)
    command = "python -m bench generate " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine()
    with Meter() as meter, tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        given = inputs(args, tmp)
        plan = {"model": given["path"], "prompts": given["prompts"], "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats}
        records, launches = [], []
        for world, runs in plan_runs(options["layouts"], options["int8_layouts"], options["pipelining"]).items():
            got, launched = launch(world, {**plan, "runs": runs}, tmp)
            records += got
            launches.append({"world": world, **launched})
        hf = [hf_baseline(given["path"], given["prompts"], args.max_new_tokens, threads, args.repeats)
              for threads in (options["hf_threads"] if given["hf_ok"] else [])]
    import datetime

    info["end"] = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M")
    result = summarize(records, hf, {**options, **given, "machine": info, "command": command.strip(),
                                     "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                                     "launches": launches, "meter": meter.result})
    print(report(result))
    if args.out:
        write_results(result, args.out)
    return result


if __name__ == "__main__":
    main()
