"""Fine-tuning starts from a local save_pretrained checkpoint and its own tokenizer."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_ranks
from tests.helpers import TINY_GPT2, reference_blocks, reference_order, run_config, tiny_config, write_corpus


@pytest.mark.multiprocess
def test_finetune_from_local_checkpoint_starts_from_its_loss(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling.build import byte_level_tokenizer

    tok = byte_level_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), eos_token_id=tok.eos_token_id, **TINY_GPT2))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)  # safetensors by default
    tok.save_pretrained(ckpt)
    assert (ckpt / "model.safetensors").is_file()

    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "ft", corpus, model__arch=None, model__config={}, model__tokenizer=None,
                      model__pretrained=str(ckpt), train__steps=2)
    first = [r for r in run_ranks(run_config, 1, cfg)[0] if "loss" in r][0]

    blocks = reference_blocks(cfg.data.train_files, cfg.data.seq_len)  # the data rule, not colonnade's code
    ids = blocks[reference_order(len(blocks), cfg.train.seed, cfg.train.micro_batch_size)]
    with torch.no_grad():
        expected = float(model(input_ids=ids, labels=ids).loss)
    # Identical weights and batch in one process: only fp32 kernel-order noise.
    assert first["loss"] == pytest.approx(expected, rel=1e-6)
    assert (tmp_path / "ft" / "run" / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.unit
def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from modeling.build import build_model

    with pytest.raises(FileNotFoundError, match="model.pretrained=.*no config.json"):
        build_model(pretrained=str(tmp_path), arch=None, config={}, vocab_size=None, seed=0)
