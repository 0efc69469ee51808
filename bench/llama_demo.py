"""A Llama of about 0.65 B parameters (fp32 training state about 13 GB) through its whole life on one box:

    python -m bench llama-demo --out bench/results/llama-demo-cpu [--work /tmp/colonnade-llama-demo]

1. a hub-style sharded checkpoint of the model (seeded weights, ``save_pretrained(max_shard_size=1GB)``: several
   ``model-0000k-of-0000n.safetensors`` + index) in ``--work``;
2. fine-tuned from it at TP=2 x PP=2 (4 processes, ZeRO-2), 2 steps, then the per-rank checkpoint;
3. that checkpoint resumed at TP=4 (4 processes), 1 more step, its checkpoint and the streamed HF export.

Each run is ``bench memory`` (per-rank peaks per phase next to the layout's formula), so the result says
whether every phase fits the box. The big files stay in ``--work``; ``--out`` gets the two reports.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench import memory

LLAMA = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=22, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
CONFIG = "configs/memory_llama.yaml"


def make_checkpoint(path: Path) -> None:
    """The sharded pretrained checkpoint (one process holds the model once, 2.6 GB)."""
    from modeling.build import build_model

    model = build_model(pretrained=None, arch="llama", config=dict(LLAMA), vocab_size=None, seed=0)
    model.save_pretrained(str(path), max_shard_size="1GB")
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters in {path}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench llama-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/llama-demo")
    parser.add_argument("--work", default="/tmp/colonnade-llama-demo")
    parser.add_argument("--make-checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_checkpoint:
        return make_checkpoint(Path(args.make_checkpoint))
    work, out = Path(args.work), Path(args.out)
    base = work / "base"
    if not (base / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, "-m", "bench.llama_demo", "--make-checkpoint", str(base)], check=True)
    pretrained = ["--config", CONFIG, "--set", f"model.pretrained={base}"]
    first = memory.main(pretrained + ["--layout", "tensor=2,pipeline=2", "--out", str(work / "tp2pp2"),
                                      "--work", str(work / "tp2pp2")])
    saved = work / "tp2pp2" / "run0" / "checkpoints" / "step_0000002"
    second = memory.main(pretrained + ["--set", f"train.resume={saved}", "--set", "train.steps=3",
                                       "--set", "train.export_hf=true", "--layout", "tensor=4",
                                       "--out", str(work / "tp4"), "--work", str(work / "tp4")])
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tp2pp2", "tp4"):
        shutil.copy(work / name / "report.md", out / f"{name}.md")
        shutil.copy(work / name / "results.json", out / f"{name}.json")
    shards = sorted(p.name for p in (work / "tp4" / "run0" / "hf").glob("*.safetensors"))
    summary = {"parameters": _parameters(base), "pretrained_files": sorted(p.name for p in base.glob("*.safetensors")),
               "export_files": shards, "rows": first + second}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _parameters(base: Path) -> int:
    index = json.loads((base / "model.safetensors.index.json").read_text())
    return int(index["metadata"]["total_size"]) // 4


if __name__ == "__main__":
    main()
