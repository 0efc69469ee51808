"""Construction without the full model (``modeling.materialize``): a rank that builds its tensor-parallel shard
on the meta device and gives values only to what it keeps gets exactly the slices of the full model, from the
seed and from a hub-style sharded checkpoint; it reads only the bytes it keeps; it never holds the whole model."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.dist import run_ranks

pytestmark = pytest.mark.multiprocess

LLAMA = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
             max_position_embeddings=32, vocab_size=101)
GPT2 = dict(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=101)


def _local(arch, fields, source, group, kept_path=None):
    from modeling.build import auto_class, model_config
    from modeling.materialize import empty_model, materialize
    from modeling.tensor_parallel import tensor_parallelize

    hf = model_config(pretrained=None, arch=arch, config=fields, vocab_size=None)
    full = empty_model(auto_class(hf), hf)
    local = tensor_parallelize(copy.deepcopy(full), group)
    kept = local.get_submodule(kept_path) if kept_path else local
    materialize(full, local, kept, source, group)
    return local


def _slices_of_the_full_model(tmp):
    import torch.distributed as dist

    from modeling.build import build_model
    from modeling.materialize import SeededInit, StoredWeights
    from modeling.shards import full_state_dict
    from training.lifecycle import init_distributed

    init_distributed()
    group = dist.group.WORLD
    checked = 0
    for arch, fields in (("llama", LLAMA), ("gpt2", GPT2)):
        dense = build_model(pretrained=None, arch=arch, config=dict(fields), vocab_size=None, seed=7)
        reference = dense.state_dict()
        # From the seed: the gathered shards are the full model's weights, bit for bit.
        local = _local(arch, fields, SeededInit(7), group)
        for name, value in full_state_dict(local, group).items():
            assert torch.equal(value, reference[name]), f"{arch} seeded {name}"
            checked += 1
        # From a hub-style sharded checkpoint (several files + model.safetensors.index.json).
        path = tmp / arch
        if dist.get_rank() == 0:
            dense.save_pretrained(path, max_shard_size="20KB")
        dist.barrier()
        assert len(list(path.glob("model-*.safetensors"))) > 2 and (path / "model.safetensors.index.json").is_file()
        local = _local(arch, fields, StoredWeights(path, "model.pretrained"), group)
        for name, value in full_state_dict(local, group).items():
            assert torch.equal(value, reference[name]), f"{arch} stored {name}"
        # Only what a rank keeps gets storage: with one block kept, the rest stays on the meta device.
        blocks = "model.layers" if arch == "llama" else "transformer.h"
        local = _local(arch, fields, SeededInit(7), group, kept_path=f"{blocks}.1")
        real = {n for n, p in local.named_parameters() if not p.is_meta}
        assert real and all(n.startswith(f"{blocks}.1.") for n in real), sorted(real)
    return checked


def test_every_rank_gets_the_slices_of_the_full_model(tmp_path):
    assert all(n > 20 for n in run_ranks(_slices_of_the_full_model, 2, tmp_path, timeout=300))


def _bytes_read(tmp):
    """Count the elements a rank reads from the safetensors files while building its TP=2 shard."""
    import torch.distributed as dist

    from modeling.build import build_model
    from modeling.materialize import StoredWeights
    from training.lifecycle import init_distributed

    init_distributed()
    group = dist.group.WORLD
    path = tmp / "llama"
    if dist.get_rank() == 0:
        build_model(pretrained=None, arch="llama", config=dict(LLAMA), vocab_size=None, seed=1).save_pretrained(path)
    dist.barrier()
    source = StoredWeights(path, "model.pretrained")
    read = []
    handle = source._handle

    class CountingSlice:
        def __init__(self, stored):
            self.stored = stored

        def __getitem__(self, index):
            piece = self.stored[index]
            read.append(piece.numel())
            return piece

        def get_shape(self):
            return self.stored.get_shape()

    class CountingHandle:
        def __init__(self, real):
            self.real = real

        def get_slice(self, name):
            return CountingSlice(self.real.get_slice(name))

        def keys(self):
            return self.real.keys()

    source._handle = lambda p: CountingHandle(handle(p))
    local = _local("llama", LLAMA, source, group)
    total = sum(t.numel() for t in build_model(pretrained=None, arch="llama", config=dict(LLAMA), vocab_size=None,
                                               seed=1).state_dict().values())
    held = sum(p.numel() for p in local.parameters())
    return sum(read), held, total


def test_a_rank_reads_only_the_bytes_it_keeps(tmp_path):
    """Everything a rank holds is read, except the zero rows that pad the vocabulary (101 -> 102: one row of
    the embedding and one of the head on rank 1), and nothing else: about half the checkpoint."""
    for read, held, total in run_ranks(_bytes_read, 2, tmp_path, timeout=300):
        assert held - 2 * 32 <= read <= held < 0.6 * total, (read, held, total)


def _peak_while_building(arch_fields):
    """Peak resident memory while building this rank's TP shard, above what the process held before."""
    from pathlib import Path

    import torch.distributed as dist

    from modeling.materialize import SeededInit
    from training.lifecycle import init_distributed

    init_distributed()
    clear = Path("/proc/self/clear_refs")

    def resident(field):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) * 1024

    clear.write_text("5")  # resets the peak (VmHWM) to what is resident now
    before = resident("VmRSS:")
    local = _local("gpt2", arch_fields, SeededInit(0), dist.group.WORLD)
    peak = resident("VmHWM:") - before
    return peak, sum(p.numel() * 4 for p in local.parameters())


def test_no_rank_holds_the_whole_model():
    """GPT-2 12 x 768 with a 512-token vocabulary (87 M parameters, 347 MB fp32) at TP=2: the peak above the
    process's start stays below 0.75 x the whole model (each rank keeps half; stand-ins add one module at a
    time). Building the whole model first, as before, peaked above 1.5 x (whole + shard)."""
    fields = dict(n_layer=12, n_head=12, n_embd=768, n_positions=128, vocab_size=512)
    whole = 4 * (12 * (12 * 768 * 768 + 13 * 768) + 640 * 768 + 768 * 2)
    for peak, held in run_ranks(_peak_while_building, 2, fields, timeout=300):
        assert held < 0.55 * whole and peak < 0.75 * whole, (peak / 2**20, held / 2**20, whole / 2**20)
