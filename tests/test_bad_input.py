"""Bad input fails on every rank with a clear message, before the first step, without hanging."""

from __future__ import annotations

import json

import pytest
import torch

from tests.dist import run_ranks
from tests.helpers import TINY_GPT2, tiny_config, write_corpus

pytestmark = pytest.mark.multiprocess


def _errors_on_every_rank(cases):
    """Run each (config, deepspeed_json) and return the error text each one raised on this rank."""
    from training import run

    messages = []
    for cfg, ds_file in cases:
        try:
            run(cfg, ds_file)
            messages.append(None)
        except Exception as exc:  # the message is what the user sees
            messages.append(f"{type(exc).__name__}: {exc}")
    return messages


def _degrees():
    from parallel.groups import ProcessGroups
    from training.lifecycle import init_distributed

    init_distributed()
    try:
        ProcessGroups.from_degrees(tensor=3, pipeline=1)
    except ValueError as exc:
        return str(exc)


@pytest.mark.slow
def test_bad_input_errors_on_every_rank_before_training(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    corpus = write_corpus(tmp_path / "corpus")
    empty = tmp_path / "empty.txt"
    empty.write_text("tiny")
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)  # 3 blocks of 32 tokens: fewer than a global batch of 2 x 2 ranks
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"train_batch_size": 3, "train_micro_batch_size_per_gpu": 2,
                                   "gradient_accumulation_steps": 1}))
    binary = tmp_path / "image.txt"
    binary.write_bytes(bytes(range(128, 256)) * 40)  # not UTF-8 from the first byte
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"text": "fine"}\n\n{"text": "broken\n')
    small_vocab = tmp_path / "small_vocab"  # a checkpoint whose 200 embeddings the byte tokenizer's ids exceed
    GPT2LMHeadModel(GPT2Config(vocab_size=200, **TINY_GPT2)).save_pretrained(small_vocab)
    saved = tiny_config(tmp_path / "g", corpus, train__steps=2)  # writes a checkpoint of n_embd=32 ...
    wider = tiny_config(tmp_path / "h", corpus, model={"arch": "gpt2", "tokenizer": "byte",  # ... resumed at 64
                                                       "config": dict(TINY_GPT2, n_embd=64)},
                        train__resume=str(tmp_path / "g" / "run"))
    cases = [
        (tiny_config(tmp_path / "a", corpus, data__train_files=[str(tmp_path / "missing*.txt")]), None),
        (tiny_config(tmp_path / "b", corpus, data__train_files=[str(empty)]), None),
        (tiny_config(tmp_path / "c", corpus), str(ds_file)),
        (tiny_config(tmp_path / "d", corpus, data__train_files=[str(malformed)]), None),
        (tiny_config(tmp_path / "e", corpus, data__train_files=[str(short)]), None),
        (tiny_config(tmp_path / "f", corpus, model={"pretrained": str(small_vocab), "tokenizer": "byte"}), None),
        (saved, None),
        (wider, None),
        (tiny_config(tmp_path / "i", corpus, precision="fp16", parallel__zero_stage=1), None),
        (tiny_config(tmp_path / "j", corpus, data__seq_len=128), None),  # GPT-2 with n_positions=64
        (tiny_config(tmp_path / "k", corpus, data__train_files=[str(binary)]), None),
    ]
    per_rank = run_ranks(_errors_on_every_rank, 2, cases, timeout=300)
    for messages in per_rank:
        (missing, too_small, batch_rule, bad_json, short_data, vocab, ok, other_model, fp16, too_long,
         not_text) = messages
        assert "data.seq_len=128 is longer than the 64 positions of this gpt2 model" in too_long
        assert f"data.train_files: {binary} is not UTF-8 text (undecodable near byte 0)" in not_text
        assert f"data.train_files: {malformed}, line 3: not valid JSON" in bad_json
        assert "data.train_files" in missing and "missing*.txt" in missing and "matches no file" in missing
        assert "data.train_files" in too_small and "fewer than one block of data.seq_len=32" in too_small
        assert "train_batch_size (3) must equal" in batch_rule and "world size 2" in batch_rule
        assert ("data.train_files: 3 training examples, fewer than one global batch of 4 (train.micro_batch_size=2 "
                "x train.grad_accum=1 x 2 data-parallel ranks)") in short_data
        assert f"data.train_files: token id 257 is outside the vocabulary of {small_vocab} (200 embeddings)" in vocab
        assert ok is None
        saved = tmp_path / "g" / "run" / "checkpoints" / "step_0000002"
        assert f"train.resume: {saved} holds a different model" in other_model
        assert "transformer.wte.weight: (260, 32) in the checkpoint, (260, 64) in this model" in other_model
        assert "precision=fp16 is not supported on this cpu accelerator" in fp16 or torch.cuda.is_available()
    for name in "abcdefhijk":  # nothing trained, nothing written (before: tokenizer/, config.yaml, ...)
        assert not (tmp_path / name / "run").exists(), sorted(p.name for p in (tmp_path / name / "run").iterdir())


def test_degrees_that_do_not_fit_the_world_size():
    for message in run_ranks(_degrees, 2, timeout=120):
        assert message and "parallel.tensor=3 x parallel.pipeline=1 = 3 does not divide the world size 2" in message


def test_existing_run_directory_is_not_overwritten(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    root = tmp_path / "r" / "run" / "checkpoints"
    (root / "step_0000004").mkdir(parents=True)
    (root / "latest").write_text("step_0000004")
    cfg = tiny_config(tmp_path / "r", corpus)
    (message,) = run_ranks(_errors_on_every_rank, 1, [(cfg, None)])[0]
    assert "already holds checkpoints" in message and "train.resume=auto" in message
    with pytest.raises(FileNotFoundError):
        from training.checkpoint import resolve_resume

        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
