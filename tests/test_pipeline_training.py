"""Pipelines inside DeepSpeed ZeRO engines in real training runs, against single-process references."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.dist import run_ranks
from tests.helpers import (
    TINY_GPT2,
    assert_exports_agree,
    assert_resumes_continue,
    reference_losses,
    run_configs,
    step_records,
    tiny_config,
    write_corpus,
)

pytestmark = pytest.mark.multiprocess

# fp32 as in test_zero_parity / test_tp_training: ~1e-6 relative observed over 10 steps.
LOSS_TOL = 1e-4
NORM_TOL = 1e-4
FP16_LOSS_TOL = 1e-3  # fp16 PP=2 x DP=2 vs the fp32 reference: 2.4e-5 relative measured over 10 steps
FOUR_LAYERS = dict(TINY_GPT2, n_layer=4, n_head=4)




def _check(histories, names, ref_loss, ref_norm):
    for name, history in zip(names, histories):
        steps = step_records(history)
        assert len(steps) == 10, name
        assert [r["loss"] for r in steps] == pytest.approx(ref_loss, rel=LOSS_TOL), name
        assert [r["grad_norm"] for r in steps] == pytest.approx(ref_norm, rel=NORM_TOL), name


@pytest.mark.slow
def test_pp2_dp2_zero2_and_schedules_match_single_process(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    common = dict(parallel__pipeline=2, model__config=FOUR_LAYERS, train__grad_accum=4)
    cfgs = [tiny_config(tmp_path / "z2", corpus, parallel__zero_stage=2, **common),
            tiny_config(tmp_path / "gpipe", corpus, parallel__zero_stage=1, parallel__schedule="gpipe", **common),
            tiny_config(tmp_path / "inter", corpus, parallel__zero_stage=1, parallel__schedule="interleaved",
                        parallel__virtual_stages=2, **common)]
    ref_loss, ref_norm = reference_losses(cfgs[0], global_batch=2 * 4 * 2)  # micro 2 x 4 micro-batches x dp 2
    assert max(ref_norm) > cfgs[0].optim.grad_clip
    histories = run_ranks(run_configs, 4, cfgs, timeout=600)[0]
    _check(histories, ["PP2xDP2 ZeRO-2 1F1B", "PP2xDP2 ZeRO-1 GPipe", "PP2xDP2 ZeRO-1 interleaved"],
           ref_loss, ref_norm)


@pytest.mark.slow
def test_3d_tp2_pp2_dp2_zero1_matches_single_process(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "3d", corpus, parallel__tensor=2, parallel__pipeline=2, parallel__zero_stage=1,
                      model__config=FOUR_LAYERS, train__grad_accum=2)
    ref_loss, ref_norm = reference_losses(cfg, global_batch=2 * 2 * 2)
    histories = run_ranks(run_configs, 8, [cfg], timeout=900)[0]
    _check(histories, ["TP2xPP2xDP2 ZeRO-1"], ref_loss, ref_norm)


def _tied_weights(cfg):
    from training import run

    result = run(cfg)
    model, groups = result.model, result.groups
    if groups.is_first_stage:
        return "embedding", model.transformer.wte.weight.detach().numpy().copy()
    return "head", model.lm_head.weight.detach().numpy().copy()


def test_tied_embeddings_stay_tied_across_stages(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "tied", corpus, parallel__pipeline=2, parallel__zero_stage=1, train__steps=5,
                      train__grad_accum=2, train__export_hf=True)
    (kind0, first), (kind1, last) = run_ranks(_tied_weights, 2, cfg, timeout=300)
    assert (kind0, kind1) == ("embedding", "head")
    np.testing.assert_array_equal(first, last)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "tied" / "run" / "hf")
    np.testing.assert_array_equal(exported.transformer.wte.weight.detach().numpy(), first)


def _runs_then_one_without_zeroed_partitions(cfgs, mutated):
    """Rank function: ``run_configs(cfgs)``, then ``mutated`` with the executor's per-step zeroing of ZeRO-3's
    gradient partitions removed (DeepSpeed's own copy-then-add rule alone)."""
    from training.pipeline import PipelineRunner

    histories = run_configs(cfgs)
    PipelineRunner._new_step = lambda self: None
    return histories, run_configs([mutated])[0]


@pytest.mark.slow
def test_pp2_dp2_zero3_matches_single_process_resumes_elsewhere_and_exports(tmp_path):
    """ZeRO-3 partitions each stage's parameters over its data-parallel group; the executor's many forwards
    and backwards per step gather and release them. 10 steps of 1F1B and of interleaved 1F1B match the
    reference with clipping active; the step-5 checkpoint resumes on one process (ZeRO-1) and at TP=2 x DP=2
    (ZeRO-2) to the same steps 6-10; the end-of-run exports agree."""
    corpus = write_corpus(tmp_path / "corpus")
    common = dict(model__config=FOUR_LAYERS, train__micro_batch_size=2)
    zero3 = tiny_config(tmp_path / "z3", corpus, parallel__zero_stage=3, parallel__pipeline=2, train__grad_accum=4,
                        train__save_every=5, train__export_hf=True, **common)
    interleaved = dict(parallel__zero_stage=3, parallel__pipeline=2, parallel__schedule="interleaved",
                       parallel__virtual_stages=2, train__grad_accum=4, **common)
    interleaved, mutated = (tiny_config(tmp_path / name, corpus, **interleaved) for name in ("z3i", "z3m"))
    ref_loss, ref_norm = reference_losses(zero3, global_batch=2 * 4 * 2)
    assert max(ref_norm) > zero3.optim.grad_clip
    (z3_hist, z3i_hist), mutated_hist = run_ranks(_runs_then_one_without_zeroed_partitions, 4,
                                                  [zero3, interleaved], mutated, timeout=600)[0]
    _check([z3_hist, z3i_hist], ["PP2xDP2 ZeRO-3 1F1B", "PP2xDP2 ZeRO-3 interleaved"], ref_loss, ref_norm)
    # The interleaved schedule's first backward skips the rank's first chunk: DeepSpeed alone would add its
    # gradients to the previous step's (measured 0.6 % off by step 3).
    drifted = [r["loss"] for r in step_records(mutated_hist)]
    assert drifted[0] == pytest.approx(ref_loss[0], rel=LOSS_TOL)
    assert drifted[2:] != pytest.approx(ref_loss[2:], rel=1e-3)

    saved = str(tmp_path / "z3" / "run" / "checkpoints" / "step_0000005")
    single = tiny_config(tmp_path / "single", corpus, parallel__zero_stage=1, train__grad_accum=8,
                         train__resume=saved, train__export_hf=True, **common)
    tp2 = tiny_config(tmp_path / "tp2", corpus, parallel__zero_stage=2, parallel__tensor=2, train__grad_accum=4,
                      train__resume=saved, **common)
    (single_hist,) = run_ranks(run_configs, 1, [single], timeout=300)[0]
    (tp2_hist,) = run_ranks(run_configs, 4, [tp2], timeout=300)[0]
    assert_resumes_continue(z3_hist, [single_hist, tp2_hist])
    assert_exports_agree(tmp_path / "z3" / "run", tmp_path / "single" / "run")


@pytest.mark.slow
def test_sequence_parallel_with_pipelines_matches_single_process(tmp_path):
    """TP=2 with sequence parallelism x PP=2 (the sequence-split hidden state crosses the stages: half the
    sequence per message), GPT-2 with 1F1B and Llama with the interleaved schedule, against the single
    process."""
    from tests.helpers import TINY_LLAMA

    corpus = write_corpus(tmp_path / "corpus")
    common = dict(parallel__tensor=2, parallel__pipeline=2, parallel__zero_stage=1, parallel__sequence_parallel=True,
                  train__grad_accum=2)
    llama = {"arch": "llama", "tokenizer": "byte", "config": dict(TINY_LLAMA, num_hidden_layers=4)}
    cfgs = [tiny_config(tmp_path / "gpt2", corpus, model__config=FOUR_LAYERS, **common),
            tiny_config(tmp_path / "llama", corpus, parallel__schedule="interleaved", parallel__virtual_stages=2,
                        **{**common, "model": llama})]
    references = [reference_losses(cfg, global_batch=2 * 2) for cfg in cfgs]
    histories = run_ranks(run_configs, 4, cfgs, timeout=900)[0]
    for name, history, (ref_loss, ref_norm) in zip(("GPT-2 SP x PP 1F1B", "Llama SP x PP interleaved"), histories,
                                                   references):
        _check([history], [name], ref_loss, ref_norm)


@pytest.mark.slow
def test_zero_bubble_schedule_matches_single_process(tmp_path):
    """ZB-H1 (backward split into B and W ops) inside DeepSpeed engines: GPT-2 PP=2 x DP=2 at ZeRO-2 (Conv1D
    blocks, the tied head's deferred gradient meeting the embedding sync) and Llama TP=2 x PP=2 with sequence
    parallelism at ZeRO-1 (the tensor-parallel layers' deferred gradients), against the single process."""
    from tests.helpers import TINY_LLAMA

    corpus = write_corpus(tmp_path / "corpus")
    llama = {"arch": "llama", "tokenizer": "byte", "config": dict(TINY_LLAMA, num_hidden_layers=4)}
    cfgs = [tiny_config(tmp_path / "gpt2", corpus, parallel__pipeline=2, parallel__zero_stage=2,
                        parallel__schedule="zb-h1", model__config=FOUR_LAYERS, train__grad_accum=4),
            tiny_config(tmp_path / "llama", corpus, parallel__tensor=2, parallel__pipeline=2, parallel__zero_stage=1,
                        parallel__sequence_parallel=True, parallel__schedule="zb-h1", train__grad_accum=4,
                        model=llama)]
    references = [reference_losses(cfgs[0], global_batch=2 * 4 * 2), reference_losses(cfgs[1], global_batch=2 * 4)]
    histories = run_ranks(run_configs, 4, cfgs, timeout=900)[0]
    for name, history, (ref_loss, ref_norm) in zip(("GPT-2 PP2xDP2 ZeRO-2 ZB-H1", "Llama SP TP2xPP2 ZeRO-1 ZB-H1"),
                                                   histories, references):
        _check([history], [name], ref_loss, ref_norm)


def _fp16_pipeline(cfg, overflow_step=None, mutation=None):
    """Rank function: train ``cfg`` in fp16 on the CPU (DeepSpeed refuses fp16 on a CPU accelerator, but its
    CPU kernels run it: the flag is forced here, for the test only). ``overflow_step``: an inf enters a gradient
    of pipeline stage 0 only, at that step. ``mutation`` 'scale-twice': the bug where a stage's backward of a
    received (already scaled) gradient is scaled again. Returns (history, (pipeline rank, the steps whose update
    was skipped on this rank, this rank's final loss scale))."""
    import torch
    from deepspeed.accelerator import get_accelerator

    import training.pipeline as pipeline
    from training import run
    from training.events import Observer

    get_accelerator().is_fp16_supported = lambda: True
    if mutation == "scale-twice":
        pipeline.PipelineRunner._loss_scale = lambda self: 1.0
    skipped = []

    class Overflow(Observer):
        def on_built(self, built):
            self.engine, self.groups, self.handle = built.engine, built.groups, None

        def on_phase_start(self, phase, step):
            if phase == "step" and step == overflow_step and self.groups.pp_rank == 0:
                param = next(p for p in self.engine.module.parameters() if p.requires_grad)
                self.handle = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))

        def on_phase_end(self, phase, step, record):
            if phase != "step":
                return
            if self.handle is not None:
                self.handle.remove()
                self.handle = None
            if not self.engine.was_step_applied():
                skipped.append(step)

    from training.faults import TrainingStopped

    try:
        result = run(cfg, observers=[Overflow()])
    except TrainingStopped as stopped:
        return str(stopped), None
    return result.history, (result.groups.pp_rank, skipped, float(result.engine.optimizer.loss_scale))


@pytest.mark.slow
def test_fp16_with_pipelines_scales_once_and_an_overflow_on_one_stage_skips_everywhere(tmp_path):
    """fp16 with dynamic loss scaling at PP=2 x DP=2 (tied GPT-2 embeddings, whose sync backward carries the
    scale too), with 1F1B and ZB-H1: the losses follow the fp32 single-process reference within fp16's
    rounding; the mutation that scales a received gradient a second time does not. An inf in one gradient of
    stage 0 at step 3 skips that step on every rank and leaves every rank's loss scale alike."""
    corpus = write_corpus(tmp_path / "corpus")

    def cfg(name, schedule="1f1b"):
        return tiny_config(tmp_path / name, corpus, parallel__pipeline=2, parallel__zero_stage=1, precision="fp16",
                           parallel__schedule=schedule, model__config=FOUR_LAYERS, train__grad_accum=2)

    ref_loss, _ = reference_losses(cfg("good"), global_batch=2 * 2 * 2)
    runs = {name: run_ranks(_fp16_pipeline, 4, cfg(name, schedule), overflow, mutation, timeout=600)
            for name, schedule, overflow, mutation in (("good", "1f1b", None, None), ("zb", "zb-h1", None, None),
                                                       ("overflow", "1f1b", 3, None),
                                                       ("twice", "1f1b", None, "scale-twice"))}
    good_ranks = [rank for _, rank in runs["good"]]
    for name in ("good", "zb"):  # ZB-H1: the W passes hand over gradients that carry the scale, once
        losses = [r["loss"] for r in step_records(runs[name][0][0])]
        print(f"fp16 PP ({name}) vs fp32 reference:", np.max(np.abs(np.array(losses) / np.array(ref_loss) - 1)))
        assert losses == pytest.approx(ref_loss, rel=FP16_LOSS_TOL), name
    assert "consecutive steps had a non-finite loss or gradient" in runs["twice"][0][0], \
        "scaled twice, every step overflows: the mutation went unnoticed"
    overflow_ranks = [rank for _, rank in runs["overflow"]]
    skipped = {stage_skips for _, stage_skips, _ in [(r[0], tuple(r[1]), r[2]) for r in overflow_ranks]}
    assert skipped == {tuple(sorted(set(good_ranks[0][1]) | {3}))}, overflow_ranks
    assert len({scale for *_, scale in overflow_ranks}) == 1, overflow_ranks  # one scaler state on every rank


def _measured_with_a_slow_block(cfg):
    """Rank function: ``pipeline_partition.measure`` on the run's meta model with block 0 slowed by 30 ms per
    forward; returns (the costs, the partition string the measured partition cuts)."""
    import time

    import torch

    from modeling import pipeline_partition
    from modeling.build import auto_class, byte_level_tokenizer
    from modeling.materialize import empty_model
    from parallel.groups import ProcessGroups
    from parallel.partition import partition_string, stage_specs
    from training.assembly import rank_model, run_model_config
    from training.lifecycle import init_distributed
    from training.pipeline import pipeline_settings

    init_distributed()
    groups = ProcessGroups.from_degrees(1, 1)
    hf = run_model_config(cfg, byte_level_tokenizer())
    full = empty_model(auto_class(hf), hf)
    model, _ = rank_model(cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"pipeline": 1})}),
                          full, groups)
    model.transformer.h[0].register_forward_pre_hook(lambda module, args: time.sleep(0.03))
    costs = pipeline_partition.measure(model, groups, torch.device("cpu"), pipeline_settings(cfg))
    specs = stage_specs(4, 2, 1, "measured", pipeline_partition.block_weights(costs))
    assert all(p.is_meta for p in model.parameters()), "the probe leaves the model on the meta device"
    return costs, partition_string(specs)


def test_measured_partition_balances_a_slow_block_and_trains_like_one_process(tmp_path):
    """parallel.partition=measured: a block made 30 ms slower is measured so and gets a stage of its own
    (uniform would give 'E,t,t|t,t,L'); a PP=2 run with it matches the single process, and says and saves the
    layout it chose."""
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "measured", corpus, parallel__pipeline=2, parallel__zero_stage=1,
                      parallel__partition="measured", model__config=FOUR_LAYERS, train__grad_accum=2)
    ((costs, layout),) = run_ranks(_measured_with_a_slow_block, 1, cfg, timeout=300)
    assert costs["blocks"][0] > 0.03 > max(costs["blocks"][1:]), costs
    assert layout == "E,t|t,t,t,L"
    ref_loss, ref_norm = reference_losses(cfg, global_batch=2 * 2)
    histories = run_ranks(run_configs, 2, [cfg], timeout=600)[0]
    _check(histories, ["PP2 measured partition"], ref_loss, ref_norm)
    saved = json.loads((tmp_path / "measured" / "run" / "pipeline_partition.json").read_text())
    assert saved["partition"].count("|") == 1 and len(saved["seconds"]["blocks"]) == 4
