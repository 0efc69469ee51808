"""``train.compile`` (training/compile.py): compiled blocks train as eager ones do, composed with tensor and
sequence parallelism, pipelines, ZeRO and recomputation, against eager colonnade (dropout on) and against the
single-process transformers + torch reference (dropout off); compilation really happens; a compiled block that
draws inductor's own dropout masks fails the comparison; the refused compositions are named before any step."""

from __future__ import annotations

import pytest

from tests.dist import run_ranks
from tests.helpers import TINY_GPT2, reference_losses, run_config, step_records, tiny_config, write_corpus

GPT2 = dict(TINY_GPT2, n_embd=64, n_head=4)  # 2 layers, hidden 64: compiling on 2 CPU cores is the cost
DROPOUT = dict(GPT2, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)

# Against eager colonnade, dropout on: the same masks (fallback_random) and the same operations, inductor fusing
# them and possibly reordering fp32 reductions (layer norm, softmax sums): observed 0 over three AdamW steps;
# inductor's own masks (the mutation) move the loss by ~9e-4.
EAGER_TOL = 1e-5
WITH_EAGER = {
    "TP=2 + SP, selective": dict(parallel__tensor=2, parallel__sequence_parallel=True,
                                 parallel__activation_checkpointing="selective"),
    "TP=2, full": dict(parallel__tensor=2, parallel__activation_checkpointing="full"),
}
# Against the independent reference, dropout off: the sharded GEMMs' summation order and inductor's fusions,
# observed <= 1e-7; 1e-4 as the layout fuzz (a wrong block or a dropped collective is off by > 1e-2).
REFERENCE_TOL = 1e-4
WITH_REFERENCE = {
    "TP=2": dict(parallel__tensor=2),
    "PP=2 1F1B, full": dict(parallel__pipeline=2, parallel__zero_stage=1, train__grad_accum=2,
                            parallel__activation_checkpointing="full"),
    "DP=2 ZeRO-2": dict(parallel__zero_stage=2),
}


def _runs(cfgs, mutate_at=None):
    """Rank function: train each config; (its history, the graphs dynamo compiled for it). Dynamo's caches are
    reset between runs, so each compiles as a fresh process would; ``mutate_at``: the run compiled with
    inductor's own random numbers (fallback_random off)."""
    import torch
    from torch._dynamo.utils import counters

    import training.compile

    results = []
    for index, cfg in enumerate(cfgs):
        torch._dynamo.reset()
        counters.clear()
        options = training.compile.OPTIONS
        if index == mutate_at:
            training.compile.OPTIONS = {}
        try:
            results.append((run_config(cfg), counters["stats"]["unique_graphs"]))
        finally:
            training.compile.OPTIONS = options
    return results


def _losses(history):
    return [r["loss"] for r in step_records(history)], [r["grad_norm"] for r in step_records(history)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_compiled_runs_equal_eager_and_the_reference(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfgs, names = [], []
    for name, sections in WITH_EAGER.items():
        for compiled in (False, True):
            names.append((name, compiled))
            cfgs.append(tiny_config(tmp_path / f"{len(cfgs)}", corpus, model__config=DROPOUT, train__steps=3,
                                    train__compile=compiled, **sections))
    mutated = len(cfgs)
    cfgs.append(cfgs[1].model_copy(update={"train": cfgs[1].train.model_copy(
        update={"output_dir": str(tmp_path / "mutated")})}))
    for name, sections in WITH_REFERENCE.items():
        names.append((name, True))
        cfgs.append(tiny_config(tmp_path / f"{len(cfgs)}", corpus, model__config=GPT2, train__steps=3,
                                train__compile=True, **sections))
    results = run_ranks(_runs, 2, cfgs, mutated, timeout=900)[0]
    for (name, compiled), (_, graphs) in zip(names, results[:mutated] + results[mutated + 1:]):
        assert (graphs > 0) == compiled, (name, compiled, graphs)  # compiled runs compile, eager ones do not
    for i, name in enumerate(WITH_EAGER):
        (eager_loss, eager_norm), (loss, norm) = _losses(results[2 * i][0]), _losses(results[2 * i + 1][0])
        print(f"{name}: compiled/eager loss {max(abs(a / b - 1) for a, b in zip(loss, eager_loss)):.1e}")
        assert loss == pytest.approx(eager_loss, rel=EAGER_TOL), name
        assert norm == pytest.approx(eager_norm, rel=EAGER_TOL), name
    wrong_masks, _ = _losses(results[mutated][0])
    right_masks, _ = _losses(results[1][0])
    assert wrong_masks != pytest.approx(right_masks, rel=10 * EAGER_TOL)  # the mutation is seen
    for (name, cfg), (history, _) in zip(zip(WITH_REFERENCE, cfgs[mutated + 1:]), results[mutated + 1:]):
        replicas = 2 // (cfg.parallel.tensor * cfg.parallel.pipeline)
        ref_loss, ref_norm = reference_losses(cfg, replicas * cfg.train.micro_batch_size * cfg.train.grad_accum)
        loss, norm = _losses(history)
        print(f"{name}: compiled/reference loss {max(abs(a / b - 1) for a, b in zip(loss, ref_loss)):.1e}")
        assert loss == pytest.approx(ref_loss, rel=REFERENCE_TOL), name
        assert norm == pytest.approx(ref_norm, rel=REFERENCE_TOL), name


@pytest.mark.unit
@pytest.mark.parametrize("sections, named", [
    (dict(parallel__zero_stage=3), "train.compile with parallel.zero_stage=3: ZeRO-3 gathers"),
    (dict(parallel__context=2, parallel__zero_stage=1), "train.compile with parallel.context=2"),
])
def test_refused_compositions_are_named(tmp_path, sections, named):
    from training.compile import compile_blocks
    from training.config import ConfigError

    cfg = tiny_config(tmp_path, tmp_path, train__compile=True, **sections)
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        compile_blocks(object(), cfg)
