"""``parallel.offload``: ZeRO offload of the optimizer state (and, under ZeRO-3, the parameters) to host memory
trains what ZeRO-0 trains, and the layouts DeepSpeed cannot offload are refused by name."""

from __future__ import annotations

import pytest

from tests.dist import run_ranks
from tests.helpers import reference_losses, tiny_config, write_corpus
from training.config import ConfigError
from training.deepspeed_config import deepspeed_config

# As tests/test_zero_parity.py: fp32, DP=2 averages two half-batch gradients where the reference takes one mean,
# ~1e-6 apart after 10 steps; a missed step, a stale moment or a wrong clip is > 1e-3.
LOSS_TOL = 2e-5
NORM_TOL = 1e-4


def _train(cfgs):
    """Rank function: each config's logged records and what DeepSpeed's ZeRO optimizer says it offloads."""
    from training import run

    results = [run(cfg) for cfg in cfgs]
    offloaded = [{flag: bool(getattr(r.engine.optimizer, flag, False))
                  for flag in ("cpu_offload", "offload_optimizer", "offload_param")} for r in results]
    return [r.history for r in results], offloaded


@pytest.mark.slow
@pytest.mark.multiprocess
def test_offloaded_zero_2_and_3_train_what_zero_0_trains(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    layouts = [(0, "none"), (2, "optimizer"), (3, "optimizer+params")]
    cfgs = [tiny_config(tmp_path / f"z{stage}-{offload}", corpus, parallel__zero_stage=stage,
                        parallel__offload=offload, train__eval_batches=None) for stage, offload in layouts]
    ref_loss, ref_norm = reference_losses(cfgs[0], global_batch=2 * 2)
    histories, offloaded = run_ranks(_train, 2, cfgs)[0]
    # on this CPU box host and device memory are one: what shows the offload is DeepSpeed taking its path
    assert offloaded == [{"cpu_offload": False, "offload_optimizer": False, "offload_param": False},
                         {"cpu_offload": True, "offload_optimizer": False, "offload_param": False},
                         {"cpu_offload": False, "offload_optimizer": True, "offload_param": True}]
    steps = [[r for r in history if "loss" in r] for history in histories]
    assert max(ref_norm) > cfgs[0].optim.grad_clip, "clipping must be active for this test to mean much"
    for (_stage, offload), records in zip(layouts, steps):
        assert len(records) == 10
        assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in steps[0]], rel=LOSS_TOL), offload
        assert [r["loss"] for r in records] == pytest.approx(ref_loss, rel=LOSS_TOL), offload
        assert [r["grad_norm"] for r in records] == pytest.approx(ref_norm, rel=NORM_TOL), offload
    for stage, offload in layouts:  # the end-of-run checkpoint of an offloaded run is complete
        assert list((tmp_path / f"z{stage}-{offload}" / "run" / "checkpoints").glob("step_0000010/manifest.json"))


@pytest.mark.unit
def test_offload_maps_onto_deepspeed_zero_sections(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path, corpus, parallel__zero_stage=3, parallel__offload="optimizer+params")
    ds = deepspeed_config(cfg, 2)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # colonnade's AdamW steps the offloaded partitions
    plain = deepspeed_config(tiny_config(tmp_path, corpus, parallel__zero_stage=2), 2)
    assert "offload_optimizer" not in plain["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in plain


@pytest.mark.unit
@pytest.mark.parametrize("stage, offload, message", [
    (0, "optimizer", r"parallel.offload=optimizer needs ZeRO.*set parallel.zero_stage=1, 2 or 3"),
    (2, "optimizer+params", r"offloads parameters only under ZeRO-3.*set parallel.zero_stage=3")])
def test_offload_that_deepspeed_cannot_do_is_refused_by_name(tmp_path, stage, offload, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, write_corpus(tmp_path / "corpus"), parallel__zero_stage=stage, parallel__offload=offload)


@pytest.mark.multiprocess
def test_an_offloaded_run_resumes_exactly_from_its_checkpoint(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    first = tiny_config(tmp_path / "first", corpus, parallel__zero_stage=2, parallel__offload="optimizer",
                        train__save_every=5, train__eval_batches=None)
    checkpoint = tmp_path / "first" / "run" / "checkpoints" / "step_0000005"
    resumed = tiny_config(tmp_path / "resumed", corpus, parallel__zero_stage=2, parallel__offload="optimizer",
                          train__resume=str(checkpoint), train__eval_batches=None)
    histories, _ = run_ranks(_train, 2, [first])[0]
    (resumed_history,), _ = run_ranks(_train, 2, [resumed])[0]
    losses = [r["loss"] for r in histories[0] if "loss" in r]
    # the offloaded fp32 masters and AdamW moments come back from the checkpoint: steps 6-10 bit for bit
    assert [r["loss"] for r in resumed_history if "loss" in r] == losses[5:]
