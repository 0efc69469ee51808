"""Hugging Face weight files written tensor by tensor: the layout save_pretrained would write, files the
safetensors library reads back exactly, and memory that holds one tensor, not the shard or the model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bench.memory import PhasePeaks
from training.checkpoint import hf_files

pytestmark = pytest.mark.unit

MiB = 2**20


def _source(tmp_path, tensors: int, mib_each: int):
    generator = torch.Generator().manual_seed(0)
    state = {f"layer.{i}.weight": torch.randn(mib_each * MiB // 4, generator=generator) for i in range(tensors)}
    save_file(state, str(tmp_path / "source.safetensors"))
    return {name: tuple(t.shape) for name, t in state.items()}


def test_sharded_files_and_index_hold_every_tensor_once(tmp_path):
    shapes = _source(tmp_path, tensors=6, mib_each=1)
    plan = hf_files.shard_plan({n: (s, torch.float32) for n, s in shapes.items()}, max_shard_size=2 * MiB)
    out = tmp_path / "out"
    out.mkdir()
    with safe_open(str(tmp_path / "source.safetensors"), framework="pt") as source:
        hf_files.write_weights(out, plan, source.get_tensor)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) == 3 and files[0] == "model-00001-of-00003.safetensors"
    assert sorted(index["weight_map"]) == sorted(shapes) and index["metadata"]["total_size"] == 6 * MiB
    source = load_file(str(tmp_path / "source.safetensors"))
    for name, filename in index["weight_map"].items():
        assert torch.equal(load_file(str(out / filename))[name], source[name])


def test_one_file_and_no_index_when_it_fits(tmp_path):
    shapes = _source(tmp_path, tensors=2, mib_each=1)
    plan = hf_files.shard_plan({n: (s, torch.float32) for n, s in shapes.items()})
    with safe_open(str(tmp_path / "source.safetensors"), framework="pt") as source:
        hf_files.write_weights(tmp_path, plan, source.get_tensor)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "model.safetensors.index.json").exists()


def test_streamed_file_reads_back_exactly_in_every_dtype(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 5, generator=generator), "half": torch.randn(7, generator=generator).half(),
               "brain": torch.randn(2, 3, generator=generator).bfloat16(), "step": torch.tensor(4.0),
               "ids": torch.arange(6, dtype=torch.int64).view(2, 3), "empty": torch.zeros(0, 4),
               "mask": torch.tensor([True, False, True])}
    specs = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    hf_files.write_safetensors(tmp_path / "x.safetensors", specs, tensors.__getitem__, {"note": "kept"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items())
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"note": "kept"}


def test_writing_holds_about_one_tensor_not_the_shard(tmp_path):
    shapes = _source(tmp_path, tensors=16, mib_each=8)  # a 128 MiB model in 16 MiB shards
    plan = hf_files.shard_plan({n: (s, torch.float32) for n, s in shapes.items()}, max_shard_size=16 * MiB)
    out = tmp_path / "out"
    out.mkdir()
    peaks = PhasePeaks()
    with safe_open(str(tmp_path / "source.safetensors"), framework="pt") as source:
        peaks.start("load")
        hf_files.write_weights(out, plan, source.get_tensor)
        peaks.end()
    above = peaks.peaks["load"] - peaks.runtime
    # the tensor being written (8 MiB) plus allocator slack; one shard is 16 MiB (save_file would hold it
    # twice: the tensors and their serialised copy), the whole model 128 MiB
    assert above < 16 * MiB, f"{above / MiB:.0f} MiB above the start"
    assert len(list(out.glob("model-*.safetensors"))) == 8
