"""Any layout's tensor rebuilt from the pieces another layout saved (no processes: the pieces are written here
the way ranks write them, by the one slice rule, and read back by a rank of another layout)."""

from __future__ import annotations

import json

import pytest
import torch

from modeling.shards import Shard
from parallel.layers import shard_ranges
from training.checkpoint.files import CheckpointError
from training.checkpoint.hf_files import write_safetensors
from training.checkpoint.pieces import INDEX, CheckpointReader, Piece

pytestmark = pytest.mark.unit

FULL = (10, 6)  # a fused weight of 2 chunks of rows, padded to 12 rows at TP=2 and 16 at TP=4


def _shard(rank: int, world: int, dim: int = 0, chunks: int = 2, transposed: bool = False) -> Shard:
    if world == 1:
        return Shard(None)
    padded = -(-FULL[dim] // (world * chunks)) * world * chunks
    ranges, size = shard_ranges(FULL[dim], rank, world, chunks, padded)
    return Shard(dim, tuple(ranges), size, transposed)


def _save(tmp_path, full: torch.Tensor, tp: int, dp: int, transposed: bool = False) -> None:
    """The files a TP=``tp`` x DP=``dp`` run writes: each data-parallel replica a flat share of its TP shard."""
    index = {}
    for t in range(tp):
        shard = _shard(t, tp, transposed=transposed)
        local = shard.cut(full)  # in the rank's layout (transposed for Conv1D)
        flat, share = local.reshape(-1), -(-local.numel() // dp)
        for d in range(dp):
            file, key = f"rank-{t}-{d}.safetensors", "model/w"
            start = min(d * share, flat.numel())
            values = flat[start:start + share].clone()
            piece = Piece(file, key, start, values.numel(), tuple(local.shape), FULL, shard, "F32")
            write_safetensors(tmp_path / file, {key: (tuple(values.shape), values.dtype)}, {key: values}.get,
                              {key: json.dumps(piece.describe())})
            index.setdefault(key, []).append(piece.describe())
    (tmp_path / INDEX).write_text(json.dumps({"tensors": index}))


@pytest.mark.parametrize("saved_tp,saved_dp,transposed", [(2, 3, False), (4, 1, False), (1, 2, False),
                                                          (2, 2, True)])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_layout_reads_exactly_its_shard(tmp_path, saved_tp, saved_dp, transposed, tp):
    full = torch.arange(60, dtype=torch.float32).view(FULL)
    _save(tmp_path, full, saved_tp, saved_dp, transposed)
    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader.full("model/w"), full)
    for rank in range(tp):
        wanted = _shard(rank, tp, transposed=transposed)
        expected = wanted.cut(full)
        got = reader.local("model/w", wanted, tuple(expected.shape), torch.float32)
        assert torch.equal(got, expected), (rank, tp)


def test_reads_only_the_saved_shards_that_overlap(tmp_path):
    full = torch.arange(60, dtype=torch.float32).view(FULL)
    _save(tmp_path, full, 4, 1)
    reader = CheckpointReader(tmp_path)
    opened = []
    original = reader._handle
    reader._handle = lambda file: opened.append(file) or original(file)
    # TP=2 rank 0 holds rows 0-2 and 6-8; the TP=4 ranks saved rows 0-1|8-9, 2-3, 4-5 and 6-7
    wanted = _shard(0, 2)
    reader.local("model/w", wanted, tuple(wanted.cut(full).shape), torch.float32)
    assert sorted(set(opened)) == ["rank-0-0.safetensors", "rank-1-0.safetensors", "rank-3-0.safetensors"]


def test_a_missing_piece_is_named_not_filled_with_garbage(tmp_path):
    full = torch.arange(60, dtype=torch.float32).view(FULL)
    _save(tmp_path, full, 2, 3)
    index = json.loads((tmp_path / INDEX).read_text())
    index["tensors"]["model/w"] = [p for p in index["tensors"]["model/w"] if p["file"] != "rank-1-1.safetensors"]
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model/w"):
        CheckpointReader(tmp_path).full("model/w")


class _Conv1DOwner(torch.nn.Module):
    hf_conv1d = True


def _zero3_conv1d(monkeypatch, tp_rank: int, tp: int, full: int, inner: int, chunks: int) -> torch.nn.Module:
    """A tensor-parallel rank's GPT-2 ``c_attn`` (Conv1D, held (out, in)) as ZeRO-3 leaves it: the parameter a
    flat empty partition, its unpartitioned shape in ``ds_shape``; the tensor-parallel group faked."""
    import modeling.shards as shards_module

    monkeypatch.setattr(shards_module.dist, "get_world_size", lambda group=None: tp)
    monkeypatch.setattr(shards_module.dist, "get_rank", lambda group=None: tp_rank)
    model = torch.nn.Module()
    model.c_attn = _Conv1DOwner()
    weight = torch.nn.Parameter(torch.empty(0))
    weight.ds_shape = torch.Size((full // tp, inner))
    weight.tensor_model_parallel, weight.partition_dim = True, 0
    weight.tp_full_size, weight.tp_fused_chunks = full, chunks
    model.c_attn.weight = weight
    return model


def test_zero3_conv1d_saved_at_tp2_dp2_reads_back_at_tp1(tmp_path, monkeypatch):
    """GPT-2's fused c_attn (Conv1D (in=32, out=96), q/k/v chunks) saved at TP=2 x DP=2 under ZeRO-3 (each
    replica a flat partition of its TP-local (48, 32) tensor), read at TP=1 (ZeRO-1), whole and by ranges."""
    from modeling.shards import shards

    inner, out, tp, dp = 32, 96, 2, 2
    full = torch.arange(inner * out, dtype=torch.float32).view(inner, out)
    index = {}
    for t in range(tp):
        ranges, _ = shard_ranges(out, t, tp, 3, out)  # this rank's q, k and v columns
        local = torch.cat([full[:, a:b] for a, b in ranges], dim=1).t()  # what the rank holds, (out, in)
        shard = shards(_zero3_conv1d(monkeypatch, t, tp, out, inner, 3), "tp")["c_attn.weight"]
        assert shard == Shard(1, tuple(ranges), out // tp, True)
        flat, share = local.reshape(-1), -(-local.numel() // dp)  # ZeRO-3's partition
        for d in range(dp):
            file, key = f"rank-{t}-{d}.safetensors", "model/w"
            values = flat[d * share:(d + 1) * share].clone()
            piece = Piece(file, key, d * share, values.numel(), tuple(local.shape), (inner, out), shard, "F32")
            write_safetensors(tmp_path / file, {key: (tuple(values.shape), values.dtype)}, {key: values}.get,
                              {key: json.dumps(piece.describe())})
            index.setdefault(key, []).append(piece.describe())
    (tmp_path / INDEX).write_text(json.dumps({"tensors": index}))
    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader.full("model/w"), full)
    assert torch.equal(reader.local("model/w", Shard(None), (inner, out), torch.float32), full)
    flat = full.reshape(-1)
    for start, stop in [(0, 1536), (1536, 3072), (0, 1000), (1000, 2048), (2048, 3072), (37, 41), (95, 97)]:
        got = reader.local_range("model/w", Shard(None), (inner, out), torch.float32, start, stop)
        assert torch.equal(got, flat[start:stop]), (start, stop)
