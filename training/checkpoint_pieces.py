"""The tensors of a per-rank checkpoint: which piece of which tensor each file holds, and any layout's
tensor rebuilt from the pieces that overlap it.

Every rank stores, for each tensor it owns, one flat range of its local tensor: the part no other
data-parallel replica stores (its ZeRO partition, or an even share of a replicated tensor). Where that local
tensor lies in the full HF-layout tensor is its ``Shard`` (``modeling.parallelize``, the one slice rule).
A ``Piece`` records both; ``CheckpointReader.local`` rebuilds the local tensor of another layout from the
pieces of the saved shards that overlap it, reading no others.

Keys are ``<kind>/<HF name>``, kind ``model`` (the weights), ``exp_avg``, ``exp_avg_sq`` or ``master``.
A checkpoint of format 1 (one gathered ``model.safetensors`` and ``optimizer.safetensors``) reads as whole
pieces of unsharded tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
import torch
from safetensors import safe_open

from modeling.parallelize import Shard
from training.checkpoint_files import CheckpointError
from training.hf_files import dtype_named

INDEX = "index.json"


@dataclass(frozen=True)
class Piece:
    file: str
    key: str
    start: int  # first element of the piece in the flattened local tensor
    numel: int
    local_shape: tuple[int, ...]
    full_shape: tuple[int, ...]
    shard: Shard
    dtype: str  # safetensors' name ("F32", "BF16", ...)

    def describe(self) -> dict:
        """What the file's metadata (as JSON) and the checkpoint's index store."""
        return {"file": self.file, "key": self.key, "start": self.start, "numel": self.numel,
                           "local": list(self.local_shape), "full": list(self.full_shape), "dtype": self.dtype,
                           "shard": [self.shard.dim, [list(r) for r in self.shard.ranges], self.shard.size,
                                     self.shard.transposed]}

    @classmethod
    def parse(cls, d: dict) -> Piece:
        dim, ranges, size, transposed = d["shard"]
        return cls(d["file"], d["key"], d["start"], d["numel"], tuple(d["local"]), tuple(d["full"]),
                   Shard(dim, tuple(tuple(r) for r in ranges), size, transposed), d["dtype"])


class CheckpointReader:
    """The pieces of a checkpoint directory, by key, and the tensors any layout needs from them."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._open: dict[str, object] = {}
        if (self.path / INDEX).is_file():
            index = json.loads((self.path / INDEX).read_text())
            self.pieces = {key: [Piece.parse(p) for p in found] for key, found in index["tensors"].items()}
        else:
            self.pieces = self._whole_files()

    def _whole_files(self) -> dict[str, list[Piece]]:
        """Format 1: every tensor whole, weights in model.safetensors, 'kind/name' in optimizer.safetensors."""
        pieces = {}
        for file, prefix in (("model.safetensors", "model/"), ("optimizer.safetensors", "")):
            for name in self._handle(file).keys():
                stored = self._handle(file).get_slice(name)
                shape = tuple(stored.get_shape())
                pieces[prefix + name] = [Piece(file, name, 0, math.prod(shape), shape, shape, Shard(None),
                                               stored.get_dtype())]
        return pieces

    def _handle(self, file: str):
        if file not in self._open:
            self._open[file] = safe_open(str(self.path / file), framework="pt")
        return self._open[file]

    def names(self, kind: str) -> dict[str, tuple[int, ...]]:
        """HF name -> full shape of every tensor of ``kind`` saved."""
        return {key.partition("/")[2]: found[0].full_shape for key, found in self.pieces.items()
                if key.startswith(kind + "/")}

    def has(self, key: str) -> bool:
        return key in self.pieces

    def dtype(self, key: str) -> torch.dtype:
        return dtype_named(self.pieces[key][0].dtype)

    def full(self, key: str) -> torch.Tensor:
        """The whole HF-layout tensor, in its saved dtype."""
        shape = self.pieces[key][0].full_shape
        return self.local(key, Shard(None), shape, self.dtype(key))

    def local(self, key: str, shard: Shard, local_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The tensor of ``key`` as a rank of another layout holds it (its ``shard`` of the full tensor, in its
        layout, zeros where the shard is padding), read only from the saved shards that overlap it."""
        found = self.pieces.get(key)
        if not found:
            raise CheckpointError(f"{self.path}: the checkpoint holds no {key}")
        out = torch.zeros(local_shape, dtype=dtype)
        by_shard: dict[Shard, list[Piece]] = {}
        for piece in found:
            by_shard.setdefault(piece.shard, []).append(piece)
        covered = 0
        for saved, pieces in by_shard.items():
            overlaps = _overlaps(saved, shard, pieces[0].full_shape)
            if overlaps:
                source = self._saved_local(key, pieces, dtype)
                covered += _copy_overlaps(source, saved, out, shard, overlaps)
        if covered != _held(found[0].shard, shard, found[0].full_shape):
            raise CheckpointError(f"{self.path}: the saved pieces of {key} do not cover it (damaged {INDEX}?)")
        return out

    def _saved_local(self, key: str, pieces: list[Piece], dtype: torch.dtype) -> torch.Tensor:
        """One saved rank's local tensor, from the flat pieces its data-parallel replicas wrote."""
        local = torch.empty(pieces[0].local_shape, dtype=dtype)
        flat, filled = local.view(-1), 0
        for piece in sorted(pieces, key=lambda p: p.start):
            if piece.start != filled:
                break
            flat[piece.start:piece.start + piece.numel] = self._handle(piece.file).get_tensor(piece.key).reshape(-1)
            filled += piece.numel
        if filled != flat.numel():
            raise CheckpointError(f"{self.path}: elements {filled}.. of a saved shard of {key} are in no file")
        return local


def _segments(shard: Shard, length: int) -> list[tuple[int, int, int]]:
    """(full start, full stop, local offset) of each run of the shard's sharded dimension."""
    if shard.dim is None:
        return [(0, length, 0)]
    runs, offset = [], 0
    for start, stop in shard.ranges:
        runs.append((start, stop, offset))
        offset += stop - start
    return runs


def _sharded_dim(saved: Shard, wanted: Shard) -> int:
    if saved.dim is not None and wanted.dim is not None and saved.dim != wanted.dim:
        raise CheckpointError(f"a tensor saved sharded along dimension {saved.dim} is wanted sharded along "
                              f"{wanted.dim}; the tensor-parallel plan of this model changed")
    return saved.dim if saved.dim is not None else (wanted.dim or 0)


def _overlaps(saved: Shard, wanted: Shard, full_shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(offset in the saved local tensor, offset in the wanted one, length) along the sharded dimension."""
    if not full_shape:
        return [(0, 0, 1)]
    length = full_shape[_sharded_dim(saved, wanted)]
    found = []
    for a, b, old in _segments(saved, length):
        for c, d, new in _segments(wanted, length):
            start, stop = max(a, c), min(b, d)
            if start < stop:
                found.append((old + start - a, new + start - c, stop - start))
    return found


def _hf_view(tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    return tensor.t() if shard.transposed else tensor


def _copy_overlaps(source: torch.Tensor, saved: Shard, out: torch.Tensor, wanted: Shard,
                   overlaps: list[tuple[int, int, int]]) -> int:
    """Copy the overlapping runs; returns how many positions of the sharded dimension were filled."""
    src, dst = _hf_view(source, saved), _hf_view(out, wanted)
    if src.dim() == 0:
        dst.copy_(src)
        return 1
    dim = _sharded_dim(saved, wanted)
    for old, new, length in overlaps:
        dst.narrow(dim, new, length).copy_(src.narrow(dim, old, length))
    return sum(length for _, _, length in overlaps)


def _held(saved: Shard, wanted: Shard, full_shape: tuple[int, ...]) -> int:
    """Positions of the sharded dimension the wanted tensor holds real values at (padding excluded)."""
    if not full_shape:
        return 1
    if wanted.dim is None:
        return full_shape[_sharded_dim(saved, wanted)]
    return sum(stop - start for start, stop in wanted.ranges)

