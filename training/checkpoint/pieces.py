"""The tensors of a per-rank checkpoint: which piece of which tensor each file holds, and any layout's
tensor rebuilt from the pieces that overlap it.

Every rank stores, for each tensor it owns, one flat range of its local tensor: the part no other
data-parallel replica stores (its ZeRO partition, or an even share of a replicated tensor). Where that local
tensor lies in the full HF-layout tensor is its ``Shard`` (``modeling.shards``, the one slice rule).
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

from modeling.shards import Shard
from training.checkpoint.files import CheckpointError
from training.checkpoint.hf_files import dtype_named

INDEX = "index.json"
# File pages a reader leaves mapped before it closes its files: pages of an open safetensors file that were read
# count in the process's resident memory until it is closed (a resume touched 1.9 GB of them per rank).
MAPPED_BYTES = 256 * 2**20


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
        self._mapped = 0
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
        return self.local_range(key, shard, local_shape, dtype, 0, math.prod(local_shape)).view(local_shape)

    def local_range(self, key: str, shard: Shard, local_shape: tuple[int, ...], dtype: torch.dtype,
                    start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of that tensor flattened (e.g. one ZeRO partition's), flat: only the rows
        of the local tensor that hold them are built, from only the saved rows they overlap."""
        found = self.pieces.get(key)
        if not found:
            raise CheckpointError(f"{self.path}: the checkpoint holds no {key}")
        if not local_shape:
            local_shape, shard = (1,), Shard(None)
        row = math.prod(local_shape[1:])
        rows = (start // row, -(-stop // row))
        out = torch.zeros((rows[1] - rows[0],) + tuple(local_shape[1:]), dtype=dtype)
        by_shard: dict[Shard, list[Piece]] = {}
        for piece in found:
            by_shard.setdefault(piece.shard, []).append(piece)
        covered, full_shape = 0, found[0].full_shape or (1,)
        for saved, pieces in by_shard.items():
            window = _Window(saved, shard, full_shape, rows)
            if window.overlaps:
                source = self._saved_rows(key, pieces, dtype, window.saved_rows(pieces[0].local_shape or (1,)))
                covered += window.copy(source, out)
        if covered != _Window(found[0].shard, shard, full_shape, rows).held():
            raise CheckpointError(f"{self.path}: the saved pieces of {key} do not cover it (damaged {INDEX}?)")
        return out.view(-1)[start - rows[0] * row:stop - rows[0] * row]

    def _saved_rows(self, key: str, pieces: list[Piece], dtype: torch.dtype, rows: tuple[int, int]) -> torch.Tensor:
        """Rows ``rows`` of one saved rank's local tensor, from the flat pieces its data-parallel replicas wrote."""
        shape = pieces[0].local_shape or (1,)
        row = math.prod(shape[1:])
        first, last = rows[0] * row, rows[1] * row
        local = torch.empty((rows[1] - rows[0],) + tuple(shape[1:]), dtype=dtype)
        flat, filled = local.view(-1), 0
        for piece in sorted(pieces, key=lambda p: p.start):
            lo, hi = max(first, piece.start), min(last, piece.start + piece.numel)
            if lo >= hi:
                continue
            if lo != first + filled:
                break
            flat[filled:filled + hi - lo] = self._read(piece, lo - piece.start, hi - piece.start, row)
            filled += hi - lo
        if filled != flat.numel():
            raise CheckpointError(f"{self.path}: elements {first + filled}.. of a saved shard of {key} are in no file")
        return local

    def _read(self, piece: Piece, lo: int, hi: int, row: int) -> torch.Tensor:
        """Elements ``[lo, hi)`` of a stored piece, flat: a flat range of a format-2 piece, whole rows of a
        format-1 tensor (stored whole, in its shape)."""
        stored = self._handle(piece.file).get_slice(piece.key)
        dims = len(stored.get_shape())
        if dims == 0:
            part = self._handle(piece.file).get_tensor(piece.key).reshape(-1)
        else:
            part = (stored[lo:hi] if dims == 1 else stored[lo // row:hi // row]).reshape(-1)
        self._mapped += part.numel() * part.element_size()
        if self._mapped > MAPPED_BYTES:
            self._open.clear()  # unmapped; the pages stay in the page cache, out of this process
            self._mapped = 0
        return part


class _Window:
    """Rows ``rows`` (along dimension 0 of the wanted rank's local tensor) of the wanted shard, and what the
    saved shard ``saved`` holds of them: ``overlaps`` (offset in the saved local tensor, offset in the wanted
    one, length) along the sharded dimension, in the HF layout, clipped to the rows where they run along it."""

    def __init__(self, saved: Shard, wanted: Shard, full_shape: tuple[int, ...], rows: tuple[int, int]):
        self.saved, self.wanted, self.rows = saved, wanted, rows
        self.dim = _sharded_dim(saved, wanted)
        self.length = full_shape[self.dim]
        self.along = _row_dim(wanted) == self.dim  # the rows cut the sharded dimension
        self.overlaps = [clipped for old, new, length in _overlaps(saved, wanted, full_shape)
                         if (clipped := self._clip(old, new, length))]

    def _clip(self, old: int, new: int, length: int):
        if not self.along:
            return old, new, length
        start, stop = max(new, self.rows[0]), min(new + length, self.rows[1])
        return (old + start - new, start - self.rows[0], stop - start) if start < stop else None

    def saved_rows(self, saved_shape: tuple[int, ...]) -> tuple[int, int]:
        """The rows of the saved local tensor the overlaps need."""
        if _row_dim(self.saved) == self.dim:
            return min(o for o, _, _ in self.overlaps), max(o + n for o, _, n in self.overlaps)
        return self.rows if not self.along else (0, saved_shape[0])

    def copy(self, source: torch.Tensor, out: torch.Tensor) -> int:
        """Copy the overlaps from ``source`` (rows ``saved_rows`` of the saved local tensor) into ``out`` (the
        window's rows); returns how many positions of the sharded dimension were filled."""
        src, dst = _hf_view(source, self.saved), _hf_view(out, self.wanted)
        first = self.saved_rows(tuple(source.shape))[0] if _row_dim(self.saved) == self.dim else 0
        if not self.along and _row_dim(self.saved) != _row_dim(self.wanted):
            src = src.narrow(_row_dim(self.wanted), self.rows[0], self.rows[1] - self.rows[0])
        for old, new, length in self.overlaps:
            dst.narrow(self.dim, new, length).copy_(src.narrow(self.dim, old - first, length))
        return sum(length for _, _, length in self.overlaps)

    def held(self) -> int:
        """Positions of the sharded dimension the window holds real values at (padding excluded)."""
        segments = ([(0, self.length)] if self.wanted.dim is None else
                    [(new, new + stop - start) for start, stop, new in _segments(self.wanted, self.length)])
        if not self.along:
            return sum(stop - start for start, stop in segments)
        return sum(max(0, min(stop, self.rows[1]) - max(start, self.rows[0])) for start, stop in segments)


def _row_dim(shard: Shard) -> int:
    """The HF dimension along which a local tensor's rows (its dimension 0) run."""
    return 1 if shard.transposed else 0


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
