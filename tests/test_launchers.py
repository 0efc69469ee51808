"""The same YAML runs under python, torchrun and the deepspeed launcher; the quickstart runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY_GPT2, write_corpus

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env():
    env = dict(os.environ, WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    env.pop("RANK", None)
    return env


def _tiny_yaml(tmp_path, corpus) -> Path:
    raw = {"model": {"arch": "gpt2", "tokenizer": "byte", "config": TINY_GPT2},
           "data": {"train_files": [str(corpus / "part[0-2].txt")], "valid_files": [str(corpus / "part3.txt")],
                    "seq_len": 32},
           "train": {"steps": 3, "micro_batch_size": 2, "output_dir": str(tmp_path / "out"), "progress": False},
           "parallel": {"zero_stage": 1}, "logging": {"wandb": {"mode": "disabled"}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _launch(argv, tmp_path, timeout=300):
    out = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.parametrize("launcher", ["python", "torchrun", "deepspeed"])
def test_same_config_under_each_launcher(tmp_path, launcher):
    config = _tiny_yaml(tmp_path, write_corpus(tmp_path / "corpus"))
    argv = {"python": [sys.executable, "train.py"],
            "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "2", "train.py"],
            "deepspeed": [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29731", "train.py"],
            }[launcher]
    _launch(argv + ["--config", str(config)], tmp_path)
    ds = json.loads((tmp_path / "out" / "deepspeed.json").read_text())
    assert ds["train_batch_size"] == 2 * (1 if launcher == "python" else 2)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert (tmp_path / "out" / "hf" / "model.safetensors").is_file()


def test_quickstart_end_to_end(tmp_path):
    """configs/quickstart.yaml as `make train` runs it (2 processes), shortened: perplexity falls."""
    out_dir = tmp_path / "quickstart"
    _launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "train.py", "--config", "configs/quickstart.yaml",
             "--set", "train.steps=60", "--set", "train.eval_every=30", "--set", "optim.warmup_steps=10",
             "--set", f"train.output_dir={out_dir}", "--set", "logging.wandb.mode=disabled"], tmp_path, timeout=600)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["perplexity"] for r in records if "perplexity" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert (out_dir / "hf" / "tokenizer.json").is_file() and (out_dir / "tokenizer" / "tokenizer.json").is_file()
