"""colonnade's step vs a plain transformers + torch training loop, one process, same model and batch.

Both train the same GPT-2 config on the same packed blocks in the same order, fp32 (bf16 on CUDA), with
AdamW, gradient clipping and a warm-up/cosine schedule. Each side gets warm-up steps that are not timed;
the median step time of the timed steps is compared. The two alternate in ABBA order over ``--rounds``
(plain, colonnade, colonnade, plain, ...), so drift of the machine and whichever-runs-first effects fall
on both sides equally; the per-run medians are reported so the spread is visible.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 256}


def _config(args, out: Path):
    from training.config import validate

    return validate({
        "model": {"arch": "gpt2", "tokenizer": "byte", "config": MODEL},
        "data": {"train_files": [args.files], "seq_len": args.seq_len},
        "train": {"steps": args.warmup + args.steps, "micro_batch_size": args.micro_batch_size,
                  "output_dir": str(out), "progress": False, "export_hf": False, "log_every": 1},
        "optim": {"lr": 3e-4, "warmup_steps": args.warmup},
        "parallel": {"zero_stage": args.zero_stage},
        "precision": args.precision,
        "logging": {"wandb": {"mode": "disabled"}},
    })


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(cfg) -> list[float]:
    """The baseline: what a user writes with transformers + torch and no framework."""
    import torch

    from modeling.build import build_model, byte_level_tokenizer
    from training import data
    from training.engine import build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = byte_level_tokenizer()
    files = data.expand_files(cfg.data.train_files, "data.train_files")
    blocks = data.tokenize_and_pack(data.load_texts(files, "d", "text", None), tok, cfg.data.seq_len, "d")
    model = build_model(pretrained=None, arch="gpt2", config=dict(cfg.model.config), vocab_size=len(tok),
                        seed=cfg.train.seed).to(device)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.steps)
    order = data.GlobalOrder(len(blocks), cfg.train.seed)
    micro = cfg.train.micro_batch_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    times = []
    for step in range(cfg.train.steps):
        _sync(device)
        started = time.perf_counter()
        ids = blocks[[order[p] for p in range(step * micro, (step + 1) * micro)]]["input_ids"].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
        _sync(device)
        times.append(time.perf_counter() - started)
    return times


def colonnade_loop(cfg) -> list[float]:
    from training import run

    return [r["step_time_s"] for r in run(cfg).history if "step_time_s" in r]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="{stdlib}/[a-f]*.py", help="training text (glob)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds of (plain, colonnade)")
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", default="bench/results", help="directory for the JSON result")
    args = parser.parse_args(argv)

    from bench.machine import describe, slug

    timed = slice(args.warmup, None)
    runs: dict[str, list[list[float]]] = {"plain": [], "colonnade": []}
    loops = {"plain": plain_loop, "colonnade": colonnade_loop}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in (("plain", "colonnade") if r % 2 == 0 else ("colonnade", "plain")):
                cfg = _config(args, Path(tmp) / f"run{r}")
                runs[name].append(loops[name](cfg)[timed])
    pooled = {name: statistics.median(t for run in times for t in run) for name, times in runs.items()}
    baseline, ours = pooled["plain"], pooled["colonnade"]
    tokens = args.micro_batch_size * args.seq_len
    machine = describe()
    result = {"benchmark": "overhead", "machine": machine, "model": MODEL, "args": vars(args),
              "median_step_s_per_run": {n: [statistics.median(t) for t in v] for n, v in runs.items()},
              "plain_step_s": baseline, "colonnade_step_s": ours,
              "plain_tokens_per_s": tokens / baseline, "colonnade_tokens_per_s": tokens / ours,
              "throughput_ratio": baseline / ours}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"overhead-{slug(machine)}.json").write_text(json.dumps(result, indent=2))
    per_run = result["median_step_s_per_run"]
    print(f"plain transformers+torch: {tokens / baseline:,.0f} tok/s (median step per run, ms: "
          f"{', '.join(f'{t * 1e3:.1f}' for t in per_run['plain'])})")
    print(f"colonnade (ZeRO-{args.zero_stage}, 1 process): {tokens / ours:,.0f} tok/s (median step per run, ms: "
          f"{', '.join(f'{t * 1e3:.1f}' for t in per_run['colonnade'])})")
    print(f"throughput ratio colonnade / plain = {baseline / ours:.3f}")
    return result


if __name__ == "__main__":
    main()
