"""Small corpora, configs and a single-process reference trainer shared by the tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from training.config import validate

TINY_GPT2 = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
TINY_LLAMA = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32,
              "intermediate_size": 64, "max_position_embeddings": 64}


def write_corpus(directory: Path, n_files: int = 4, words: int = 1500, seed: int = 0) -> Path:
    """A few text files of pseudo-English (structured enough that a model learns something)."""
    rng = random.Random(seed)
    vocab = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "and", "then", "slept", "."]
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        text = " ".join(rng.choice(vocab) for _ in range(words))
        (directory / f"part{i}.txt").write_text(text)
    return directory


def tiny_config(tmp: Path, corpus: Path, **sections):
    """A RunConfig for a tiny from-scratch GPT-2 on ``corpus``; ``sections`` override whole keys."""
    raw = {
        "model": {"arch": "gpt2", "tokenizer": "byte", "config": dict(TINY_GPT2)},
        "data": {"train_files": [str(corpus / "part[0-2].txt")], "valid_files": [str(corpus / "part3.txt")],
                 "seq_len": 32},
        "train": {"steps": 10, "micro_batch_size": 2, "grad_accum": 1, "seed": 7, "output_dir": str(tmp / "run"),
                  "progress": False, "export_hf": False, "eval_batches": 4},
        # lr high and clip low so that clipping is active on every step and Adam moves the weights a lot
        "optim": {"lr": 3e-3, "warmup_steps": 2, "grad_clip": 0.5, "weight_decay": 0.1},
        "parallel": {"zero_stage": 0},
        "logging": {"wandb": {"mode": "disabled"}},
    }
    for dotted, value in sections.items():
        section, _, key = dotted.partition("__")
        if key:
            raw.setdefault(section, {})[key] = value
        else:
            raw[section] = value
    return validate(raw)


def reference_losses(cfg, global_batch: int) -> tuple[list[float], list[float]]:
    """Plain transformers + torch.optim.AdamW, one process, the same blocks in the same global order:
    per-step loss and pre-clip gradient norm."""
    from modeling.build import build_model, byte_level_tokenizer
    from training import data
    from training.engine import lr_lambda, param_groups

    tok = byte_level_tokenizer()
    files = data.expand_files(cfg.data.train_files, "data.train_files")
    blocks = data.tokenize_and_pack(data.load_texts(files, "t", "text", None), tok, cfg.data.seq_len, "t")
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = build_model(pretrained=None, arch=cfg.model.arch, config={**special, **cfg.model.config},
                        vocab_size=len(tok), seed=cfg.train.seed)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, cfg.train.steps))
    order = data.GlobalOrder(len(blocks), cfg.train.seed)
    losses, norms = [], []
    for step in range(cfg.train.steps):
        ids = blocks[[order[p] for p in range(step * global_batch, (step + 1) * global_batch)]]["input_ids"]
        loss, norm = reference_update(model, opt, sched, model(input_ids=ids, labels=ids).loss, cfg.optim.grad_clip)
        losses.append(loss)
        norms.append(norm)
    return losses, norms


def reference_update(model, opt, sched, loss, grad_clip: float) -> tuple[float, float]:
    """One reference optimizer step on ``loss``: backward, clip, AdamW, schedule; (loss, pre-clip norm)."""
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    opt.step()
    sched.step()
    opt.zero_grad()
    return float(loss.detach()), norm


def run_config(cfg):
    """Rank function: train ``cfg``; every logged record."""
    from training import run

    return run(cfg).history


def run_configs(cfgs):
    """Rank function: train several configs one after another in the same process group."""
    return [run_config(cfg) for cfg in cfgs]


def step_records(history):
    return [r for r in history if "loss" in r]


def assert_gradients_match(tp_model, dense, group, tol: dict) -> int:
    """Every gradient of the tensor-parallel model, gathered and merged to the HF layout, equals the dense
    model's; returns how many were compared."""
    from modeling.parallelize import full_state_dict

    grads = full_state_dict(tp_model, group, {n: p.grad for n, p in tp_model.named_parameters()})
    ref_grads = {n: p.grad for n, p in dense.named_parameters()}
    assert set(grads) == set(ref_grads)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[key], **tol, msg=lambda m: f"{key}: {m}")
    return len(grads)
