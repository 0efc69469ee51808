"""train.py as users meet it: --help and usage errors exit cleanly, and an input error reaches the console
once, from rank 0, under torchrun and the deepspeed launcher, before any step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(argv, timeout=180):
    env = dict(os.environ, WANDB_SILENT="true", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_and_usage_errors_exit_without_a_traceback():
    """Before: `SystemExit: 0` / `SystemExit: 2` tracebacks and exit code 1."""
    shown = _run([sys.executable, "train.py", "--help"])
    assert shown.returncode == 0 and "--config" in shown.stdout and "Traceback" not in shown.stderr
    usage = _run([sys.executable, "train.py"])
    assert usage.returncode == 2 and "the following arguments are required: --config" in usage.stderr
    assert "Traceback" not in usage.stderr


def _torchrun(port: int):
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port)]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_an_error_every_rank_finds_is_reported_by_rank_0(launcher):
    """Every rank finds the error; rank 0's report is on the console every time, once, with the launcher's
    exit code 2 (before: whichever rank got there first printed, often rank 1, and the launcher killed rank 0)."""
    from tests.dist import free_port

    for _attempt in range(2):
        port = free_port()
        argv = (_torchrun(port) if launcher == "torchrun" else
                [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)])
        out = _run(argv + ["train.py", "--config", "configs/quickstart.yaml", "--set", "optim.warmup_steps=100000"])
        console = out.stdout + out.stderr
        expected = ("colonnade (rank 0): error: invalid configuration (configs/quickstart.yaml):\n"
                    "  - optim.warmup_steps=100000 exceeds train.steps=300")
        assert expected in console, console[-3000:]
        assert console.count("exceeds train.steps") == 1 and "Traceback (most recent call last)" not in \
            console.partition("colonnade (rank 0)")[0]
        assert "exitcode  : 2" in console if launcher == "torchrun" else out.returncode == 2


def test_an_error_only_one_rank_finds_still_reaches_the_console():
    from tests.dist import free_port

    out = _run(_torchrun(free_port()) + ["tests/fault_driver.py", "--config-error-rank", "1", "--",
                                         "--config", "configs/quickstart.yaml"])
    console = out.stdout + out.stderr
    assert "colonnade (rank 1): error: data.train_files: only rank 1 cannot read them (injected)" in console, \
        console[-3000:]


def test_print_config_describes_the_model_and_the_layout():
    out = _run([sys.executable, "train.py", "--config", "configs/quickstart.yaml", "--print-config"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("# model: gpt2, 4 layers, hidden size 128, 1,350,400 parameters (1.4 M), vocabulary up to 4096 (BPE "
            "trained on data.train_files); from scratch") in out.stdout
    assert "# layout: world 1 = tensor 1 x pipeline 1 x data 1; ZeRO-1; fp32" in out.stdout


def test_console_of_a_run_under_torchrun(tmp_path):
    """The lines a user needs (model, layout, where the results went) and none of the libraries' banners that are
    not the user's business (before: DeepSpeed's accelerator and shm-op lines once per rank, torch's deprecation
    warning for all_gather_into_tensor)."""
    from tests.dist import free_port
    from tests.helpers import TINY_GPT2, write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"arch": "gpt2", "tokenizer": "byte", "config": TINY_GPT2},
        "data": {"train_files": [str(corpus / "part[0-2].txt")], "valid_files": [str(corpus / "part3.txt")],
                 "seq_len": 32},
        "train": {"steps": 3, "micro_batch_size": 2, "output_dir": str(tmp_path / "out"), "eval_batches": 2},
        "parallel": {"zero_stage": 1}, "logging": {"wandb": {"mode": "disabled"}}}))
    out = _run(_torchrun(free_port()) + ["train.py", "--config", str(config)])
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]
    assert "model: gpt2, 2 layers, hidden size 32" in console and "layout: world 2 = tensor 1 x pipeline 1 x data 2" \
        in console
    assert (f"done: 3 steps; metrics {tmp_path / 'out' / 'metrics.jsonl'}; checkpoint "
            f"{tmp_path / 'out' / 'checkpoints' / 'step_0000003'}; Hugging Face export {tmp_path / 'out' / 'hf'}") \
        in console
    for banner in ("Setting accelerator to CPU", "built successfully", "is deprecated", "untested optimizer",
                   "Downloading data"):
        assert banner not in console, banner
    # Resumed at another layout with the progress bar off and full recomputation: no datasets bars (before: the
    # tokenize / pack bars on every start), no transformers use_cache line, and "(1f1b)" not "1 virtual stages".
    resumed = _run(_torchrun(free_port()) + ["train.py", "--config", str(config), "--set", "train.resume=auto",
                                             "--set", "train.steps=5", "--set", "train.progress=false",
                                             "--set", "parallel.pipeline=2",
                                             "--set", "parallel.activation_checkpointing=full"])
    console = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, console[-3000:]
    assert "layout: world 2 = tensor 1 x pipeline 2 (1f1b) x data 1" in console, console[-3000:]
    for noise in ("tokenize data.train_files", "pack data.train_files", "use_cache", "virtual stages", "it/s]"):
        assert noise not in console, (noise, console[-3000:])
