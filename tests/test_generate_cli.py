"""``python -m training.generate`` as users run it: a plain process and torchrun give the same JSON lines; bad
input is one line naming it, exit code 2, nothing else on the console (run through ``main`` in a launched rank:
the same code path without an interpreter start per case)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.dist import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = "def main():\nimport os\nclass Foo(object):\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from modeling.build import byte_level_tokenizer

    tok = byte_level_tokenizer()
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=len(tok),
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "gpt2"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    (path.parent / "prompts.txt").write_text(PROMPTS)
    return path


def _run(args: list[str], torchrun: int = 0, stdin: str | None = None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun)]
                if torchrun else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, "-m", "training.generate", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)


def _records(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.subprocess
def test_plain_process_and_torchrun_pipeline_give_the_same_lines(model_dir):
    prompts = str(model_dir.parent / "prompts.txt")
    plain = _records(_run(["--model", str(model_dir), "--prompts", prompts, "--max-new-tokens", "12"]))
    assert [r["prompt"] for r in plain] == PROMPTS.splitlines()
    assert all(len(r["token_ids"]) == 12 and r["ttft_s"] > 0 and r["tpot_s"] > 0 for r in plain)
    piped = _records(_run(["--model", str(model_dir), "--pipeline", "2", "--tensor", "1", "--prompts", prompts,
                           "--max-new-tokens", "12"], torchrun=2))
    assert [r["token_ids"] for r in piped] == [r["token_ids"] for r in plain]
    sampled = [_records(_run(["--model", str(model_dir), "--prompts", "-", "--max-new-tokens", "12",
                              "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"], stdin=PROMPTS))
               for _ in range(2)]
    assert [r["token_ids"] for r in sampled[0]] == [r["token_ids"] for r in sampled[1]]
    assert [r["token_ids"] for r in sampled[0]] != [r["token_ids"] for r in plain]


def _main_in_rank(args: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    from training.generate import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ["missing", "other_model", "too_long", "layout", "option", "no_prompts"])
def test_bad_input_is_one_line(model_dir, tmp_path, case):
    prompts = str(model_dir.parent / "prompts.txt")
    if case == "other_model":  # the config.json of another model beside these weights
        other = tmp_path / "other"
        other.mkdir()
        for item in model_dir.iterdir():
            (other / item.name).write_bytes(item.read_bytes())
        config = json.loads((model_dir / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    args = {"missing": ["--model", str(tmp_path / "nothing")],
            "other_model": ["--model", str(tmp_path / "other")],
            "too_long": ["--model", str(model_dir), "--max-new-tokens", "80"],
            "layout": ["--model", str(model_dir), "--tensor", "2"],
            "option": ["--model", str(model_dir), "--top-p", "1.5"],
            "no_prompts": ["--model", str(model_dir), "--prompts", str(tmp_path / "none.txt")]}[case]
    code, stdout, stderr = run_ranks(_main_in_rank, 1, args + ([] if case == "no_prompts" else
                                                                ["--prompts", prompts]), timeout=120)[0]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("generate: "), stderr[-2000:]
    expected = {"missing": "no such directory", "other_model": "shapes differ", "too_long": "64 positions",
                "layout": "--tensor 2", "option": "--top-p", "no_prompts": "no such file"}[case]
    assert expected in lines[0], lines[0]
    assert stdout == ""
