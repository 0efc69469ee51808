"""bench memory: per-phase peaks that reset between phases, and a tiny real run at TP=2."""

from __future__ import annotations

import json
import time

import pytest
import torch

from bench.formulas import largest_layer_params, model_state_bytes
from bench.memory import MMAP_THRESHOLD, PhasePeaks, main
from bench.variant import parse_variant


@pytest.mark.unit
def test_each_phase_sees_its_own_peak_not_an_earlier_one():
    peaks = PhasePeaks()
    peaks.start("load")
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, held for 20 samples of the 1 ms sampler
    time.sleep(0.02)
    del big
    peaks.start("steps")
    small = torch.ones(4 * 2**20 // 4)  # 4 MiB
    time.sleep(0.02)
    del small
    peaks.end()
    above = {phase: peak - peaks.runtime for phase, peak in peaks.peaks.items()}
    assert above["load"] >= 64 * 2**20
    # without the reset the steps phase would report the load phase's 64 MiB high-water mark
    assert above["steps"] < 32 * 2**20, above


@pytest.mark.unit
def test_variant_strings():
    assert parse_variant("tensor=2,pipeline=2") == ("tensor=2,pipeline=2",
                                                    ["parallel.tensor=2", "parallel.pipeline=2"], 4)
    assert parse_variant("data=2,zero=3") == ("data=2,zero=3", ["parallel.zero_stage=3"], 2)


@pytest.mark.subprocess
def test_memory_benchmark_runs_every_phase(tmp_path):
    rows = main(["--config", "configs/sweeps/base_tiny.yaml", "--layout", "tensor=2", "--out", str(tmp_path),
                 "--malloc-mmap-threshold", str(MMAP_THRESHOLD)])  # a tiny model: colonnade would not set it
    (row,) = rows
    assert row["nproc"] == 2 and row["formula_bytes"] > 0
    for phase in ("load", "steps", "optimizer", "save", "export"):
        assert row[f"{phase}_above_runtime_bytes"] > 0, phase
    ranks = json.loads((tmp_path / "results.json").read_text())["ranks"][0]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["malloc_mmap_threshold"] for r in ranks} == {str(MMAP_THRESHOLD)}
    assert (tmp_path / "report.md").read_text().count("| tensor=2 | 2 |") == 1


@pytest.mark.unit
def test_zero3_formula_adds_the_largest_layer_gathered_with_its_gradient():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=100))
    assert largest_layer_params(model) == 100 * 16  # the (tied) token embedding
    psi = 1000
    zero1 = model_state_bytes(psi, zero_stage=1, dp=2, largest_layer=100)
    zero3 = model_state_bytes(psi, zero_stage=3, dp=2, largest_layer=100)
    # fp32: weights 4 + gradients 4 bytes of the gathered layer; ZeRO-1 holds whole weights, nothing gathered
    assert zero1["gathered_layer_bytes"] == 0 and zero3["gathered_layer_bytes"] == 8 * 100
    assert sum(zero1.values()) == (4 + 4 + 8 / 2 + 4 / 2) * psi
    assert sum(zero3.values()) == (4 + 4 + 8 + 4) * psi / 2 + 800


@pytest.mark.unit
def test_saved_activations_count_what_backward_keeps_not_the_parameters():
    from bench.memory import SavedActivations

    layer = torch.nn.Linear(256, 256)
    x = torch.randn(8, 256, requires_grad=True)
    activations = SavedActivations()
    activations.reset(layer)
    with torch.autograd.graph.saved_tensors_hooks(activations.pack, activations.unpack):
        hidden = torch.relu(layer(x))  # saves x (for the weight gradient) and the relu output
        loss = (hidden * hidden).sum()  # saves hidden (the same storage as the relu output: counted once)
    assert activations.peak == activations.live == 2 * 8 * 256 * 4  # x and the relu output; the weight is not
    loss.backward()
    assert activations.live == 0 and activations.peak == 2 * 8 * 256 * 4

    flat = torch.zeros(256 * 256, requires_grad=True)  # DeepSpeed's flat buffer: the weight becomes a view of it
    layer.weight.data = flat.detach().view(256, 256)
    activations = SavedActivations()
    activations.reset(layer)
    with torch.autograd.graph.saved_tensors_hooks(activations.pack, activations.unpack):
        torch.nn.functional.linear(x, flat.view(256, 256)).sum()  # saves x and a plain view of the buffer
    assert activations.peak == 8 * 256 * 4, "a view of a parameter's storage counted as an activation"


@pytest.mark.unit
def test_memory_observer_turns_the_runs_events_into_phases_and_counts_activations_inside_steps():
    """The run's events (``training.events``) drive ``PhasePeaks`` and ``SavedActivations``: load, save and
    export are their own phases, steps run from a step's start to the next of those less the optimizer phase,
    and autograd's saved tensors are counted inside a step only."""
    from types import SimpleNamespace

    from bench.memory import MemoryObserver, SavedActivations

    layer = torch.nn.Linear(64, 64)
    peaks, activations = PhasePeaks(), SavedActivations()
    observer = MemoryObserver(peaks, activations)
    x = torch.randn(4, 64, requires_grad=True)
    observer.on_phase_start("load", 0)
    observer.on_phase_end("load", 0, None)
    observer.on_built(SimpleNamespace(engine=SimpleNamespace(module=layer)))
    observer.on_phase_start("train", 0)
    observer.on_phase_start("step", 1)
    assert peaks.current == "steps"
    torch.relu(layer(x)).sum().backward()
    observer.on_phase_start("optimizer", 1)
    assert peaks.current == "optimizer"
    observer.on_phase_end("optimizer", 1, None)
    assert peaks.current == "steps"
    observer.on_phase_end("step", 1, {"loss": 1.0})
    observer.on_phase_start("save", 1)
    observer.on_phase_end("save", 1, None)
    assert peaks.current is None
    observer.on_phase_end("train", 1, None)
    observer.on_phase_start("export", 1)
    observer.on_phase_end("export", 1, None)
    assert set(peaks.peaks) == {"load", "steps", "optimizer", "save", "export"}
    assert activations.peak == 2 * 4 * 64 * 4  # x and the relu output, saved inside the step
    torch.relu(layer(x)).sum()  # after the step: not counted (the hooks are gone)
    assert activations.peak == 2 * 4 * 64 * 4 and activations.live == 0
