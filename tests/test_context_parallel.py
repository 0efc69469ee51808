"""Context parallelism (``parallel.context``) in real training runs against the single-process reference: each
rank holds 1/N of every sequence, attention crosses the group by all-to-all (Ulysses) or ring."""

from __future__ import annotations

import os

import pytest

from tests.dist import run_ranks
from tests.helpers import (
    TINY_GPT2,
    TINY_LLAMA,
    reference_losses,
    relative_error,
    run_configs,
    step_records,
    tiny_config,
    write_corpus,
)

# fp32: the reference's one attention over the whole sequence vs per-rank chunks (Ulysses: the same kernel on
# gathered heads; ring: a blockwise softmax merged by log-sum-exp) and a mean over ranks of partial losses;
# observed <= 3e-7 relative over 10 steps. A token at the wrong position, a key outside the window or a loss
# normalised per rank instead of per sequence changes them by > 1e-3 (test_one_pass_and_mutations).
LOSS_TOL = 1e-5
NORM_TOL = 1e-5

# Qwen2 with a sliding window on its second layer (layers from max_window_layers on slide).
TINY_QWEN2 = {**TINY_LLAMA, "use_sliding_window": True, "max_window_layers": 1}

# The parity runs' sequence length: 32 in the suite (chunks of 8 tokens at context=2); the issue's 1,024 by hand:
# COLONNADE_CONTEXT_SEQ_LEN=1024 pytest tests/test_context_parallel.py -k "matches or composes" (docs/tests.md).
SEQ_LEN = int(os.environ.get("COLONNADE_CONTEXT_SEQ_LEN", "32"))
CHUNK = SEQ_LEN // 4  # a rank's chunk at context=2: sliding windows smaller and larger than it
LONG = {"data__seq_len": SEQ_LEN}


def _long(model_config: dict) -> dict:
    """``model_config`` with room for SEQ_LEN positions."""
    key = "n_positions" if "n_positions" in model_config else "max_position_embeddings"
    return {**model_config, key: max(model_config[key], SEQ_LEN)}


def _corpus(tmp_path):
    return write_corpus(tmp_path / "corpus", words=1500 * max(1, SEQ_LEN // 128))


def _write_documents(directory, count: int = 60):
    """Many short documents (one per file, each ends with EOS in the packed blocks): 1-3 boundaries per block of
    32 tokens."""
    import random

    rng = random.Random(3)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park"]
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        length = rng.randint(2, 6) * max(1, SEQ_LEN // 128)  # enough blocks at longer sequences
        (directory / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(length)))
    return directory


def _document_cfgs(tmp_path):
    """data.separate_documents: (global batch, config) at context=1 x DP=2 and at context=2."""
    docs = _write_documents(tmp_path / "docs")
    files = {"train_files": [str(docs / "doc0[0-4]*.txt")], "valid_files": [str(docs / "doc05*.txt")],
             "seq_len": SEQ_LEN, "separate_documents": True}
    llama = {"arch": "llama", "tokenizer": "byte", "config": _long(TINY_LLAMA)}
    gpt2 = {"arch": "gpt2", "tokenizer": "byte", "config": _long(TINY_GPT2)}
    cases = {"documents llama DP=2": (4, dict(model=llama)),
             "documents llama ulysses": (2, dict(model=llama, parallel__context=2)),
             "documents gpt2 ring": (2, dict(model=gpt2, parallel__context=2, parallel__context_attention="ring"))}
    return {name: (batch, tiny_config(tmp_path / f"doc{i}", docs, data=files, **overrides))
            for i, (name, (batch, overrides)) in enumerate(cases.items())}


def _cfgs(tmp_path, corpus):
    gpt2 = {"arch": "gpt2", "tokenizer": "byte", "config": _long(TINY_GPT2)}
    llama = {"arch": "llama", "tokenizer": "byte", "config": _long(TINY_LLAMA)}
    small, large = ({"arch": "qwen2", "tokenizer": "byte", "config": _long({**TINY_QWEN2, "sliding_window": w})}
                    for w in (CHUNK * 5 // 8, CHUNK * 3 // 2))
    cases = {
        "gpt2 ulysses": dict(model=gpt2, parallel__context_attention="ulysses"),
        "gpt2 ring": dict(model=gpt2, parallel__context_attention="ring"),
        "llama ulysses": dict(model=llama, parallel__context_attention="ulysses"),
        "llama ring": dict(model=llama, parallel__context_attention="ring"),
        "qwen2 window < chunk ring": dict(model=small, parallel__context_attention="ring"),
        "qwen2 window < chunk ulysses": dict(model=small, parallel__context_attention="ulysses"),
        "qwen2 window > chunk ring": dict(model=large, parallel__context_attention="ring"),
        "gpt2 ulysses selective recomputation": dict(model=gpt2, parallel__activation_checkpointing="selective"),
        "llama ring full recomputation": dict(model=llama, parallel__context_attention="ring",
                                              parallel__activation_checkpointing="full"),
        "llama ulysses mlp in 3 tiles": dict(model=llama, parallel__mlp_tiles=3),
    }
    return {name: tiny_config(tmp_path / f"run{i}", corpus, parallel__context=2, **LONG, **overrides)
            for i, (name, overrides) in enumerate(cases.items())}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_context2_matches_single_process(tmp_path):
    """GPT-2, Llama (GQA) and Qwen2 (sliding windows smaller and larger than a rank's chunk) at context=2,
    Ulysses and ring, with and without activation recomputation, with tiled MLPs, and packed documents kept apart
    (data.separate_documents, at context=1 and 2) equal the reference's losses and gradient norms for 10 steps."""
    corpus = _corpus(tmp_path)
    cfgs = {name: (2, cfg) for name, cfg in _cfgs(tmp_path, corpus).items()} | _document_cfgs(tmp_path)
    histories = run_ranks(run_configs, 2, [cfg for _, cfg in cfgs.values()], timeout=600)[0]
    for (name, (batch, cfg)), history in zip(cfgs.items(), histories):
        ref_loss, ref_norm = reference_losses(cfg, global_batch=batch)
        if cfg.data.separate_documents:  # the documents matter here: attending across them misses by > 10 x LOSS_TOL
            together = cfg.model_copy(update={"data": cfg.data.model_copy(update={"separate_documents": False})})
            assert relative_error(reference_losses(together, global_batch=batch)[0], ref_loss) > 10 * LOSS_TOL
        steps = step_records(history)
        assert len(steps) == 10, name
        assert [r["loss"] for r in steps] == pytest.approx(ref_loss, rel=LOSS_TOL), name
        assert [r["grad_norm"] for r in steps] == pytest.approx(ref_norm, rel=NORM_TOL), name


def _composed_cfgs(tmp_path, corpus):
    gpt2 = dict(model__config=_long(dict(TINY_GPT2, n_head=4)))
    llama = {"arch": "llama", "tokenizer": "byte", "config": _long(TINY_LLAMA)}
    small, large = ({"arch": "qwen2", "tokenizer": "byte", "config": _long({**TINY_QWEN2, "sliding_window": w})}
                    for w in (CHUNK * 5 // 8, CHUNK * 3 // 2))
    four = {"arch": "gpt2", "tokenizer": "byte", "config": _long(dict(TINY_GPT2, n_head=4, n_layer=4))}
    pp2 = dict(parallel__pipeline=2, parallel__zero_stage=1, train__grad_accum=2)
    cases = {  # name: (global batch, overrides)
        "tp2 ulysses": (2, dict(parallel__tensor=2, **gpt2)),
        "tp2+sp ring": (2, dict(parallel__tensor=2, parallel__sequence_parallel=True,
                                parallel__context_attention="ring", **gpt2)),
        "tp2 llama ulysses (kv repeated)": (2, dict(parallel__tensor=2, model=llama)),
        "pp2 1f1b ring": (4, dict(parallel__pipeline=2, parallel__zero_stage=1, train__grad_accum=2,
                                  parallel__context_attention="ring", **gpt2)),
        "pp2 zb-h1 llama ulysses": (4, dict(parallel__pipeline=2, parallel__zero_stage=1, train__grad_accum=2,
                                            parallel__schedule="zb-h1", model=llama)),
        "dp2 zero3 ulysses, mlp in 2 tiles": (4, dict(parallel__zero_stage=3, parallel__mlp_tiles=2, **gpt2)),
        "tp2 llama mlp in 2 tiles": (2, dict(parallel__tensor=2, parallel__mlp_tiles=2, model=llama)),
        "tp2 qwen2 window < chunk ulysses": (2, dict(parallel__tensor=2, model=small)),
        "pp2 gpipe qwen2 window > chunk ring": (4, dict(**pp2, parallel__schedule="gpipe", model=large,
                                                        parallel__context_attention="ring")),
        "pp2 interleaved ulysses": (4, dict(**pp2, parallel__schedule="interleaved", parallel__virtual_stages=2,
                                            model=four)),
        "dp2 zero3 qwen2 window < chunk ring": (4, dict(parallel__zero_stage=3, model=small,
                                                        parallel__context_attention="ring")),
        "dp2 zero3 llama ring": (4, dict(parallel__zero_stage=3, parallel__context_attention="ring", model=llama)),
    }
    return {name: (batch, tiny_config(tmp_path / f"run{i}", corpus, parallel__context=2, **LONG, **overrides))
            for i, (name, (batch, overrides)) in enumerate(cases.items())}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_context2_composes_with_tp_pp_and_zero3(tmp_path):
    """context=2 x TP=2 (with and without SP; Llama's 2 key/value heads leave one per tensor rank, repeated for
    Ulysses), context=2 x PP=2 (every schedule: the stage messages carry the rank's chunk) and context=2 x DP=2
    under ZeRO-3 (parameters partitioned over data x context), GPT-2, Llama and Qwen2 with sliding windows, equal
    the reference for 10 steps."""
    corpus = _corpus(tmp_path)
    cfgs = _composed_cfgs(tmp_path, corpus)
    histories = run_ranks(run_configs, 4, [cfg for _, cfg in cfgs.values()], timeout=900)[0]
    for (name, (batch, cfg)), history in zip(cfgs.items(), histories):
        ref_loss, ref_norm = reference_losses(cfg, global_batch=batch)
        steps = step_records(history)
        assert len(steps) == 10, name
        assert [r["loss"] for r in steps] == pytest.approx(ref_loss, rel=LOSS_TOL), name
        assert [r["grad_norm"] for r in steps] == pytest.approx(ref_norm, rel=NORM_TOL), name


def _one_pass(arch: str, method: str, mutation: str | None) -> list[float]:
    """Rank function: a context-parallel forward/backward of one batch against the whole model on one rank:
    [max relative error of the logits, of the loss, of the worst parameter gradient]."""
    import copy

    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from modeling import context
    from modeling.losses import context_lm_loss
    from parallel.context import local_tokens

    group, size = dist.group.WORLD, dist.get_world_size()
    torch.manual_seed(0)
    fields = dict(TINY_GPT2) if arch == "gpt2" else {**TINY_QWEN2, "sliding_window": 5}
    config = AutoConfig.for_model(arch, **fields, vocab_size=64, bos_token_id=0, eos_token_id=0)
    full = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = copy.deepcopy(full)
    context.apply(model, group, method)
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    out = full(input_ids=ids, labels=ids)
    out.loss.backward()
    local, positions, targets = local_tokens(ids, ids, group)
    if mutation == "local positions":
        positions = torch.arange(local.shape[1]).expand_as(local)
    if mutation == "no window":
        for module in model.modules():
            if hasattr(module, "sliding_window"):
                module.sliding_window = None
    logits = model(input_ids=local, position_ids=positions).logits
    divide = 1 if mutation == "loss per rank" else size
    loss = context_lm_loss(model.get_output_embeddings(), logits, targets, None, divide)
    loss.backward()
    index = local_tokens(torch.arange(32)[None], torch.arange(32)[None], group)[0][0]
    errors = [((logits - out.logits[:, index]).abs().max() / out.logits.abs().max()).item()]
    total = loss.detach().clone()
    dist.all_reduce(total)
    errors.append(abs(total.item() / size / out.loss.item() - 1))
    worst = 0.0
    for mine, theirs in zip(model.parameters(), full.parameters()):
        grad = mine.grad.clone()
        dist.all_reduce(grad)
        worst = max(worst, ((grad / size - theirs.grad).abs().max() / theirs.grad.abs().max()).item())
    return errors + [worst]


def _passes(cases):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return [_one_pass(*case) for case in cases]


# (arch, method, mutation): the mutation must move the compared values by far more than the tolerance.
PASSES = [("gpt2", "ulysses", None), ("gpt2", "ring", None), ("qwen2", "ulysses", None), ("qwen2", "ring", None),
          ("gpt2", "ring", "local positions"), ("qwen2", "ulysses", "no window"), ("qwen2", "ring", "no window"),
          ("gpt2", "ulysses", "loss per rank")]


@pytest.mark.multiprocess
def test_one_pass_and_mutations():
    """One forward/backward at context=2: this rank's logits, the loss and every parameter's gradient (the mean
    over the group, as the data-parallel reduction takes it) equal the whole model's on one process (fp32: 1e-5,
    observed ~1e-7); the mutations (position ids of the local chunk, the sliding window dropped, the loss
    normalised per rank) miss by > 1e-3."""
    results = run_ranks(_passes, 2, PASSES, timeout=300)[0]
    for case, errors in zip(PASSES, results):
        if case[2] is None:
            assert max(errors) < 1e-5, (case, errors)
        else:
            assert max(errors) > 1e-3, (case, errors)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_resume_at_another_context_size(tmp_path):
    """A context=2 run's step-5 checkpoint resumes at context=1 (DP=2) and at context=4 (GPT-2's 2 heads do not
    split over 4: auto falls to ring) to the uninterrupted run's steps 6-10 (1e-5: summation order only)."""
    from tests.helpers import assert_resumes_continue

    corpus = write_corpus(tmp_path / "corpus")
    full = tiny_config(tmp_path / "full", corpus, parallel__context=2, train__save_every=5)
    saved = str(tmp_path / "full" / "run" / "checkpoints" / "step_0000005")
    at_dp2 = tiny_config(tmp_path / "dp2", corpus, train__resume=saved, train__micro_batch_size=1)
    at_context4 = tiny_config(tmp_path / "cp4", corpus, train__resume=saved, parallel__context=4)
    full_history, dp2_history = run_ranks(run_configs, 2, [full, at_dp2], timeout=600)[0]
    (context4_history,) = run_ranks(run_configs, 4, [at_context4], timeout=600)[0]
    assert_resumes_continue(full_history, [dp2_history, context4_history])


@pytest.mark.unit
def test_refusals_name_the_setting(tmp_path):
    """Bad layouts are refused before anything runs, naming the key and the fix."""
    from transformers import AutoConfig

    from modeling.build import meta_model
    from modeling.context import check_context_fits
    from training.config import ConfigError

    corpus = write_corpus(tmp_path / "corpus", n_files=4, words=10)
    with pytest.raises(ConfigError, match=r"data.seq_len=32 must be divisible by 64"):
        tiny_config(tmp_path, corpus, parallel__context=32)
    with pytest.raises(ConfigError, match=r"parallel.context=2 with parallel.expert=2"):
        tiny_config(tmp_path, corpus, parallel__context=2, parallel__expert=2, parallel__zero_stage=1)
    with pytest.raises(ConfigError, match=r"parallel.mlp_tiles with parallel.sequence_parallel"):
        tiny_config(tmp_path, corpus, parallel__mlp_tiles=2, parallel__tensor=2, parallel__sequence_parallel=True)
    gpt2 = meta_model(AutoConfig.for_model("gpt2", **TINY_GPT2), False)
    with pytest.raises(ValueError, match=r"context_attention=ulysses: 2 query / 2 key-value heads .* use ring"):
        check_context_fits(gpt2, 4, "ulysses", 1)
    dropout = meta_model(AutoConfig.for_model("gpt2", **{**TINY_GPT2, "attn_pdrop": 0.1}), False)
    with pytest.raises(ValueError, match=r"attn_pdrop=0.1 has no ring implementation; set model.config.attn_pdrop"):
        check_context_fits(dropout, 4, "auto", 1)
    check_context_fits(dropout, 2, "auto", 1)  # Ulysses runs the model's own attention, dropout included


@pytest.mark.unit
def test_tiled_mlp_keeps_only_its_input():
    """parallel.mlp_tiles: a Llama block's MLP keeps only its input for the backward (h values per token)
    instead of its input twice (gate and up projections), the gate and up outputs, the activation, its product
    with up (2h + 4i per token) and the three weights (3hi), with the same loss and gradients as untiled (fp32:
    per-token math, 1e-6)."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from training.tiling import tile_mlps

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **TINY_LLAMA, vocab_size=64, bos_token_id=0, eos_token_id=0)
    plain = AutoModelForCausalLM.from_config(config)
    tiled = copy.deepcopy(plain)
    tile_mlps(tiled, 4)
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))

    def run(model):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), sum(saved), [p.grad for p in model.parameters()]

    (plain_loss, plain_saved, plain_grads), (tiled_loss, tiled_saved, tiled_grads) = run(plain), run(tiled)
    assert tiled_loss == pytest.approx(plain_loss, rel=1e-6)
    for a, b in zip(plain_grads, tiled_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    h, i, tokens = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"], ids.numel()
    per_block = tokens * (2 * h + 4 * i - h) + 3 * h * i
    assert plain_saved - tiled_saved == TINY_LLAMA["num_hidden_layers"] * per_block, (plain_saved, tiled_saved)
