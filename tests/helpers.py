"""Small corpora, configs and a single-process reference trainer shared by the tests."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
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
    """Plain transformers + torch, one process, independent of colonnade's data pipeline, schedule, parameter
    groups and loss: its own tokenization and packing of the files, its own data order, torch's AdamW and the
    schedule formula written here, HF's own loss. Only the step-0 weights come from colonnade's seeded
    initialisation (``build_model``), copied into a model built by transformers. Per-step loss and pre-clip
    gradient norm (``reference_training`` without the model)."""
    losses, norms, _ = reference_training(cfg, global_batch)
    return losses, norms


# The byte tokenizer's documented layout: the 256 byte symbols in code-point order, then bos, eos, pad, unk.
BYTE_VOCAB = 260
BYTE_SPECIALS = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (Radford et al.'s encoder.py)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def byte_tokens(data: bytes) -> list[int]:
    """The byte tokenizer's ids of ``data``: each byte's rank among GPT-2's printable symbols."""
    symbols = _bytes_to_unicode()
    token_of = {byte: rank for rank, byte in enumerate(sorted(range(256), key=lambda b: symbols[b]))}
    return [token_of[b] for b in data]


def reference_blocks(patterns: list[str], seq_len: int) -> torch.Tensor:
    """The documented data rule, written out: each text file (in sorted order) is one document of byte tokens
    followed by EOS; all are concatenated and cut into ``seq_len`` blocks, the remainder dropped."""
    import glob

    stream = []
    for path in sorted(f for pattern in patterns for f in glob.glob(pattern)):
        stream += byte_tokens(Path(path).read_bytes()) + [BYTE_SPECIALS["eos_token_id"]]
    usable = len(stream) // seq_len * seq_len
    return torch.tensor(stream[:usable]).view(-1, seq_len)


def reference_document_positions(ids: torch.Tensor) -> torch.Tensor:
    """Position ids counting from 0 in each document of the blocks (a document ends with EOS), written out."""
    rows = []
    for row in ids.tolist():
        positions, position = [], 0
        for token in row:
            positions.append(position)
            position = 0 if token == BYTE_SPECIALS["eos_token_id"] else position + 1
        rows.append(positions)
    return torch.tensor(rows)


def reference_order(num_blocks: int, seed: int, count: int) -> list[int]:
    """The documented order: a fresh permutation of the blocks every epoch, torch.randperm seeded with
    seed * 1_000_003 + epoch; the first ``count`` positions."""
    order, epoch = [], 0
    while len(order) < count:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order += torch.randperm(num_blocks, generator=generator).tolist()
        epoch += 1
    return order[:count]


def reference_lr_multiplier(optim, step: int, total_steps: int) -> float:
    """The documented schedule: linear warm-up over ``warmup_steps`` (step 0 at 1/warmup), then a half cosine
    from 1 down to ``min_lr_ratio`` at ``total_steps``."""
    import math

    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


def reference_param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and embeddings), none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


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
    from modeling.shards import full_state_dict

    grads = full_state_dict(tp_model, group, {n: p.grad for n, p in tp_model.named_parameters()})
    ref_grads = {n: p.grad for n, p in dense.named_parameters()}
    assert set(grads) == set(ref_grads)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[key], **tol, msg=lambda m, key=key: f"{key}: {m}")
    return len(grads)


def relative_error(got: list[float], expected: list[float]) -> float:
    return max(abs(a / b - 1) for a, b in zip(got, expected))


def assert_matches_reference(name: str, history: list[dict], ref: tuple[list[float], list[float]],
                             loss_tol: float, norm_tol: float) -> None:
    """Every step's loss and gradient norm of the run's ``history`` within the relative tolerances of the
    reference's; the worst of each printed."""
    steps = step_records(history)
    ref_loss, ref_norm = ref
    assert len(steps) == len(ref_loss), name
    losses, norms = [r["loss"] for r in steps], [r["grad_norm"] for r in steps]
    print(f"{name}: loss {relative_error(losses, ref_loss):.1e}, grad norm {relative_error(norms, ref_norm):.1e} "
          f"relative")
    assert losses == pytest.approx(ref_loss, rel=loss_tol), name
    assert norms == pytest.approx(ref_norm, rel=norm_tol), name


def assert_resumes_continue(full_history, resumed_histories) -> None:
    """Each resumed run's steps 6-10 equal the uninterrupted run's: only the fp32 summation order differs
    between layouts (as in test_checkpoint), 1e-5 relative."""
    expected = step_records(full_history)[5:]
    for history in resumed_histories:
        got = step_records(history)
        assert [r["step"] for r in got] == [6, 7, 8, 9, 10]
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-5)
        assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-5)


def assert_exports_agree(run_a: Path, run_b: Path) -> None:
    """The two runs' HF exports hold the same tensors up to the summation order of the same 5 steps."""
    from safetensors.torch import load_file

    a, b = load_file(run_a / "hf" / "model.safetensors"), load_file(run_b / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def reference_model(cfg) -> torch.nn.Module:
    """transformers' model of ``cfg`` (eager attention) with colonnade's seeded step-0 weights, the only thing
    the reference takes from colonnade."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from modeling.build import build_model, byte_level_tokenizer

    config = AutoConfig.for_model(cfg.model.arch, **cfg.model.config, vocab_size=BYTE_VOCAB, **BYTE_SPECIALS)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    initial = build_model(pretrained=None, arch=cfg.model.arch, config={**BYTE_SPECIALS, **cfg.model.config},
                          vocab_size=len(byte_level_tokenizer()), seed=cfg.train.seed)
    model.load_state_dict(initial.state_dict())
    return model.train()


def _documents(cfg, ids: torch.Tensor) -> dict:
    """data.separate_documents: transformers' packed-sequence position ids (its masks then keep documents apart)."""
    return {"position_ids": reference_document_positions(ids), "use_cache": False} if cfg.data.separate_documents \
        else {}  # with a cache transformers builds no packed-sequence mask


def reference_training(cfg, global_batch: int,
                       micro_batch: int | None = None) -> tuple[list[float], list[float], torch.nn.Module]:
    """The independent reference run (``reference_losses``): per-step loss, pre-clip gradient norm, and the
    trained transformers model, for comparing an export's logits with it. ``micro_batch``: one forward per run
    of that many blocks of the global batch and the mean of their HF losses, as HF Trainer accumulates
    gradients (a mixture of experts' load-balancing loss is a function of a forward's tokens); else one
    forward over the global batch."""
    blocks = reference_blocks(cfg.data.train_files, cfg.data.seq_len)
    model = reference_model(cfg)
    opt = torch.optim.AdamW(reference_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: reference_lr_multiplier(cfg.optim, step,
                                                                                        cfg.train.steps))
    order = reference_order(len(blocks), cfg.train.seed, cfg.train.steps * global_batch)
    losses, norms = [], []
    for step in range(cfg.train.steps):
        ids = blocks[order[step * global_batch:(step + 1) * global_batch]]
        parts = ids.split(micro_batch) if micro_batch else [ids]
        loss = torch.stack([model(input_ids=part, labels=part, **_documents(cfg, part)).loss for part in parts]).mean()
        loss, norm = reference_update(model, opt, sched, loss, cfg.optim.grad_clip)
        losses.append(loss)
        norms.append(norm)
    model.eval()
    return losses, norms, model
