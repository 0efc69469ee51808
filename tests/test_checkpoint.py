"""Checkpoints: crash-safe saves, damaged files named at load, resume at another (tensor, pipeline, data)
layout with the optimizer state, and the one-command HF export."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.dist import run_ranks
from tests.helpers import TINY_GPT2, run_configs, step_records, tiny_config, write_corpus
from training.checkpoint import CheckpointError, files, resolve_resume

FOUR_HEADS = dict(TINY_GPT2, n_head=4)


def _layout(tmp, corpus, name, *, tensor, pipeline, micro, accum, zero, **extra):
    return tiny_config(tmp / name, corpus, model={"arch": "gpt2", "tokenizer": "byte", "config": FOUR_HEADS},
                       parallel={"tensor": tensor, "pipeline": pipeline, "zero_stage": zero},
                       train__steps=10, train__micro_batch_size=micro, train__grad_accum=accum, **extra)


def _zero_the_moments(checkpoint: Path) -> None:
    """Tamper with a checkpoint: Adam moments set to zero in every rank's file (manifest updated, so it loads)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    manifest = json.loads((checkpoint / files.MANIFEST).read_text())
    for path in sorted(checkpoint.glob("rank-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        save_file({k: torch.zeros_like(v) if k.startswith("exp_avg") else v for k, v in load_file(path).items()},
                  str(path), metadata=metadata)
        manifest["files"][path.name] = {"bytes": path.stat().st_size, "sha256": files.sha256(path)}
    (checkpoint / files.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_at_other_layouts_continues_the_run(tmp_path):
    """Saved at TP=2 x PP=2 x DP=2 (ZeRO-1) after step 5; resumed at TP=1 x PP=1 x DP=1 (ZeRO-2 and ZeRO-3)
    and at TP=4 x DP=2 (ZeRO-1), same global batch of 8: steps 6..10 match the uninterrupted run."""
    corpus = write_corpus(tmp_path / "corpus")
    saved_at = tmp_path / "full" / "run" / "checkpoints" / "step_0000005"
    full = _layout(tmp_path, corpus, "full", tensor=2, pipeline=2, micro=1, accum=4, zero=1,
                   train__save_every=5, train__export_hf=True)
    tp4 = _layout(tmp_path, corpus, "tp4", tensor=4, pipeline=1, micro=1, accum=4, zero=1,
                  train__resume=str(saved_at))
    full_hist, tp4_hist = run_ranks(run_configs, 8, [full, tp4], timeout=600)[0]
    tampered = tmp_path / "tampered" / "step_0000005"
    shutil.copytree(saved_at, tampered)
    _zero_the_moments(tampered)
    single = _layout(tmp_path, corpus, "single", tensor=1, pipeline=1, micro=2, accum=4, zero=2,
                     train__resume=str(saved_at))
    no_moments = _layout(tmp_path, corpus, "nomoments", tensor=1, pipeline=1, micro=2, accum=4, zero=2,
                         train__resume=str(tampered))
    zero3 = _layout(tmp_path, corpus, "zero3", tensor=1, pipeline=1, micro=2, accum=4, zero=3,
                    train__resume=str(saved_at))
    single_hist, no_moments_hist, zero3_hist = run_ranks(run_configs, 1, [single, no_moments, zero3], timeout=300)[0]

    expected = step_records(full_hist)[5:]
    assert [r["step"] for r in expected] == [6, 7, 8, 9, 10]
    for hist in (tp4_hist, single_hist, zero3_hist):
        got = step_records(hist)
        assert [r["step"] for r in got] == [6, 7, 8, 9, 10]
        # Same weights, moments, LR and data order; only fp32 summation order differs between layouts
        # (tensor-parallel partial sums, pipeline/DP gradient reductions). Measured: <= 6.4e-8 relative on the
        # loss and 1.2e-7 on the grad norm over the 5 steps; 1e-5 leaves 150x for that. Losing the Adam
        # moments misses by 2e-2 (checked below).
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-5)
        assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-5)
        assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in expected], rel=1e-12)
    # The optimizer state is part of what makes it match: without the moments the run goes elsewhere.
    lost = [r["loss"] for r in step_records(no_moments_hist)]
    assert lost[1:] != pytest.approx([r["loss"] for r in expected][1:], rel=1e-2)

    # One command exports any checkpoint to HF: the final one equals the run's own export, tensor for tensor.
    out = tmp_path / "exported"
    from safetensors.torch import load_file

    from training.checkpoint.export import main as export_main

    # `python -m training.checkpoint.export RUN OUT`
    assert export_main([str(tmp_path / "full" / "run"), str(out)]) == 0

    exported = load_file(out / "model.safetensors")
    final = load_file(tmp_path / "full" / "run" / "hf" / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


def _crash_during_save(cfg, point: str, at_step: int):
    """Rank function: run ``cfg`` and die with SIGKILL at ``point`` of its checkpoint save of ``at_step``."""
    import training.checkpoint.files as cf
    import training.checkpoint.saving as saving

    staging = f".{cf.tag_for(at_step)}.partial"

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "mid-file":  # the rank's file half written under its temporary name
        original_write = saving.write_safetensors

        def half_written(path, specs, tensor_of, metadata=None):
            if staging in str(path):
                Path(path).write_bytes(b"\0" * 1000)
                die()
            return original_write(path, specs, tensor_of, metadata)
        saving.write_safetensors = half_written
    elif point in ("before-manifest", "before-latest"):
        original_write = cf.write_text_atomic
        target = cf.MANIFEST if point == "before-manifest" else "latest"

        def write(path, text):
            if path.name == target and (staging in str(path) or text.strip() == cf.tag_for(at_step)):
                die()
            return original_write(path, text)
        cf.write_text_atomic = write
    elif point == "before-rename":
        original_rename = cf.os.rename
        cf.os.rename = lambda src, dst: die() if Path(src).name == staging else original_rename(src, dst)
    from training import run

    run(cfg)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_interrupted_saves_and_damaged_files(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "r" / "run"

    def cfg(steps):
        return tiny_config(tmp_path / "r", corpus, parallel__zero_stage=1, train__steps=steps, train__save_every=2,
                           train__resume="auto")

    run_ranks(run_configs, 1, [cfg(4)])
    for point in ("mid-file", "before-manifest", "before-rename"):
        with pytest.raises(RuntimeError, match="died with exit code -9"):
            run_ranks(_crash_during_save, 1, cfg(6), point, 6)
        # The interrupted save of step 6 left only a staging directory; auto-resume takes step 4.
        assert resolve_resume("auto", run_dir).name == "step_0000004", point
        assert not (run_dir / "checkpoints" / "step_0000006").exists()
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    with pytest.raises(RuntimeError, match="died with exit code -9"):
        run_ranks(_crash_during_save, 1, cfg(6), "before-latest", 6)
    # Renamed with its manifest, so complete: it is the newest complete checkpoint even though ``latest``
    # still names step 4.
    assert resolve_resume("auto", run_dir).name == "step_0000006"

    # A flipped byte or a truncated file is named at load; nothing is loaded.
    step6 = run_dir / "checkpoints" / "step_0000006"
    weights = step6 / "rank-00000-of-00001.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{weights} does not match its SHA-256"):
        resolve_resume("auto", run_dir)
    weights.write_bytes(original)
    with open(step6 / "index.json", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(CheckpointError, match=f"{step6 / 'index.json'} is 100 bytes"):
        resolve_resume(str(step6), run_dir)


@pytest.mark.unit
def test_saving_a_step_again_replaces_it_whole(tmp_path):
    root = tmp_path / "checkpoints"
    for content in ("first", "second"):
        staging = files.begin(root, 3)
        (staging / "weights.bin").write_text(content)
        files.commit(staging, 3)
    final = root / "step_0000003"
    assert (final / "weights.bin").read_text() == "second" and files.verify(final)["step"] == 3
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000003"]  # nothing half-moved left


@pytest.mark.multiprocess
def test_a_format_1_checkpoint_still_resumes(tmp_path):
    """A checkpoint of the previous format (one gathered model/optimizer/rng file), written by colonnade at
    a680fed at TP=2 (tests/fixtures/format1/make.py), resumes on one rank: steps 3 and 4 are the ones the run
    that wrote it took. Tolerance as in the layout-change test above (TP=2 -> TP=1 summation order)."""
    fixture = Path(__file__).parent / "fixtures" / "format1"
    saved = tmp_path / "old" / "step_0000002"
    shutil.copytree(fixture / "step_0000002", saved)
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "resumed", corpus, parallel={"zero_stage": 1}, train__steps=4,
                      train__resume=str(saved))
    got = step_records(run_ranks(run_configs, 1, [cfg], timeout=300)[0][0])
    written = [json.loads(line) for line in (fixture / "metrics.jsonl").read_text().splitlines()]
    expected = [r for r in step_records(written) if r["step"] > 2]
    assert [r["step"] for r in got] == [3, 4]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-5)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-5)


def _timed_writes(cfg):
    """Rank function: train ``cfg`` with each rank's checkpoint file taking at least 1.5 s to write; returns the
    (start, end) wall times of this rank's writes."""
    import time

    import training.checkpoint.saving as saving

    original, spans = saving.write_safetensors, []

    def slow_write(path, specs, tensor_of, metadata=None):
        start = time.time()
        time.sleep(1.5)
        original(path, specs, tensor_of, metadata)
        spans.append((start, time.time()))
    saving.write_safetensors = slow_write
    from training import run

    run(cfg)
    return spans


@pytest.mark.multiprocess
def test_ranks_write_their_files_at_the_same_time(tmp_path):
    """Each rank writes its own file without waiting for another's: with every write slowed to 1.5 s, the two
    ranks' writes overlap in time."""
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "r", corpus, parallel={"tensor": 2, "zero_stage": 1}, train__steps=2)
    (rank0,), (rank1,) = run_ranks(_timed_writes, 2, cfg, timeout=300)
    assert max(rank0[0], rank1[0]) < min(rank0[1], rank1[1]), (rank0, rank1)
    saved = tmp_path / "r" / "run" / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in saved.glob("rank-*")) == ["rank-00000-of-00002.safetensors",
                                                            "rank-00001-of-00002.safetensors"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_saves_from_zero3_zero0_and_bf16_resume(tmp_path):
    """The per-rank pieces of the other writers: ZeRO-3 partitions (with their padding) and ZeRO-0's even shares
    at DP=2 resume on one rank (ZeRO-1 / ZeRO-2) to the uninterrupted runs' steps 6-10 (tolerance as above: only
    the data-parallel summation order differs); bf16 at ZeRO-2 (bf16 weights, fp32 masters and moments in
    DeepSpeed's partitions) resumes at its own layout bit for bit."""
    corpus = write_corpus(tmp_path / "corpus")

    def cfg(name, zero, ranks, resume=None, **extra):
        return tiny_config(tmp_path / name, corpus, parallel={"zero_stage": zero}, train__steps=10,
                           train__save_every=5, train__micro_batch_size=2, train__grad_accum=2 // ranks,
                           train__resume=resume, **extra)

    def saved(name):
        return str(tmp_path / name / "run" / "checkpoints" / "step_0000005")

    z3, z0, bf16 = cfg("z3", 3, 2), cfg("z0", 0, 2), cfg("bf16", 2, 2, precision="bf16")
    bf16_resumed = cfg("bf16r", 2, 2, resume=saved("bf16"), precision="bf16")
    z3_hist, z0_hist, bf16_hist, bf16r_hist = run_ranks(run_configs, 2, [z3, z0, bf16, bf16_resumed],
                                                        timeout=600)[0]
    from_z3, from_z0 = cfg("from_z3", 1, 1, resume=saved("z3")), cfg("from_z0", 2, 1, resume=saved("z0"))
    from_z3_hist, from_z0_hist = run_ranks(run_configs, 1, [from_z3, from_z0], timeout=300)[0]
    for full, resumed in ((z3_hist, from_z3_hist), (z0_hist, from_z0_hist)):
        expected, got = step_records(full)[5:], step_records(resumed)
        assert [r["step"] for r in got] == [6, 7, 8, 9, 10]
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-5)
        assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-5)
    assert [(r["loss"], r["grad_norm"]) for r in step_records(bf16r_hist)] == \
        [(r["loss"], r["grad_norm"]) for r in step_records(bf16_hist)[5:]]


def _agree_on_damaged(run_dir):
    """Rank function: ``agree_on_resume`` of ``run_dir``'s newest checkpoint, counting this rank's SHA-256s."""
    import training.checkpoint.files as cf
    from training.checkpoint import agree_on_resume
    from training.lifecycle import init_distributed

    init_distributed()
    hashed, original = [], cf.sha256
    cf.sha256 = lambda path: hashed.append(path.name) or original(path)
    try:
        agree_on_resume("auto", run_dir)
    except CheckpointError as exc:
        return str(exc), hashed
    return None, hashed


@pytest.mark.multiprocess
def test_ranks_split_the_checks_and_all_name_a_damaged_file(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "r", corpus, parallel={"tensor": 2, "zero_stage": 1}, train__steps=2)
    run_ranks(run_configs, 2, [cfg])
    saved = tmp_path / "r" / "run" / "checkpoints" / "step_0000002"
    listed = list(json.loads((saved / files.MANIFEST).read_text())["files"])
    damaged = saved / listed[1]  # the second file of the manifest: rank 1's share
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (err0, hashed0), (err1, hashed1) = run_ranks(_agree_on_damaged, 2, tmp_path / "r" / "run")
    assert err0 == err1 and f"{damaged} does not match its SHA-256" in err0
    # rank 0 hashed the even-numbered files, rank 1 the odd ones up to the damaged one, where it stopped
    assert hashed0 == listed[::2] and hashed1 == [damaged.name]


def _slow_writes_and_step_ends(cfg, delay: float, skip_host_copy: bool = False):
    """Rank function: train ``cfg`` with each checkpoint file write taking ``delay`` s more; returns (history,
    the wall times at which each step ended, the (start, end) wall times of this rank's file writes).
    ``skip_host_copy``: the mutation that writes the live state instead of its copy."""
    import time

    import training.checkpoint.saving as saving
    from training.events import Observer

    original_write, spans, step_ends = saving.write_safetensors, [], []

    class StepEnds(Observer):
        def on_phase_end(self, phase, step, record):
            if phase == "step":
                step_ends.append(time.time())

    def slow_write(path, specs, tensor_of, metadata=None):
        start = time.time()
        time.sleep(delay)
        original_write(path, specs, tensor_of, metadata)
        spans.append((start, time.time()))

    saving.write_safetensors = slow_write
    if skip_host_copy:
        saving._host_copy = lambda *snapshot: snapshot
    from training import run

    return run(cfg, observers=[StepEnds()]).history, step_ends, spans


@pytest.mark.slow
@pytest.mark.multiprocess
def test_async_saves_write_what_sync_saves_write_while_training_goes_on(tmp_path):
    """train.async_save at DP=2 (ZeRO-1: partitioned moments), every file write slowed by 1 s: the steps after
    a save end before its files are written (training goes on), the losses equal the synchronous run's, and
    every checkpoint is byte for byte the synchronous one (equal manifests: sizes and SHA-256 of every file but
    the run's own config)."""
    corpus = write_corpus(tmp_path / "corpus")

    def cfg(name, async_save):
        return tiny_config(tmp_path / name, corpus, parallel={"zero_stage": 1}, train__steps=6,
                           train__save_every=2, train__async_save=async_save)

    (sync_hist, sync_ends, sync_spans), _ = run_ranks(_slow_writes_and_step_ends, 2, cfg("sync", False), 1.0,
                                                      timeout=300)
    (async_hist, async_ends, async_spans), _ = run_ranks(_slow_writes_and_step_ends, 2, cfg("async", True), 1.0,
                                                         timeout=300)
    assert sync_ends[2] > sync_spans[0][1], "a synchronous save blocks the next step"
    assert async_ends[2] < async_spans[0][1], "step 3 ended only after the step-2 checkpoint was written"
    assert [r["loss"] for r in step_records(async_hist)] == [r["loss"] for r in step_records(sync_hist)]
    for step in (2, 4, 6):
        tag = f"step_{step:07d}"
        sync_dir, async_dir = (tmp_path / n / "run" / "checkpoints" / tag for n in ("sync", "async"))
        written = [files.read_manifest(d)["files"] for d in (sync_dir, async_dir)]
        for manifest in written:
            manifest.pop("run_config.yaml")  # the run's own config: output_dir and async_save differ
        assert written[0] == written[1], tag
        assert not [p.name for p in async_dir.iterdir() if p.name.startswith(".")], "markers left behind"
    assert resolve_resume("auto", tmp_path / "async" / "run").name == "step_0000006"
    run_ranks(_slow_writes_and_step_ends, 2, cfg("live", True), 1.0, True, timeout=300)
    live, sync = (tmp_path / n / "run" / "checkpoints" / "step_0000002" for n in ("live", "sync"))
    assert files.read_manifest(live)["files"]["rank-00000-of-00002.safetensors"] != \
        files.read_manifest(sync)["files"]["rank-00000-of-00002.safetensors"], "the mutation went unnoticed"
