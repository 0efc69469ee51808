"""Compressed data-parallel gradient averaging with error feedback (``parallel.grad_compression``).

A flat fp32 gradient buffer is averaged over a process group as an all-reduce made of two compressed halves:
each rank encodes its buffer in ``n`` equal chunks and sends chunk ``j`` to rank ``j`` (``all_to_all_single``),
rank ``j`` decodes the ``n`` pieces of its chunk, sums them in fp32 in rank order and divides by ``n`` (the
reduce-scatter, accumulated in fp32 as Megatron's bf16 reduce-scatter does), encodes that mean and every rank
gathers all the means (``all_gather_into_tensor``). Every rank decodes the same bytes, so replicas stay equal.

Codecs: ``bf16`` (2 bytes per value), ``int8`` and ``int4`` (one fp32 scale per block of ``BLOCK`` values,
absmax / 127 or / 7, round to nearest, int4 packed two to a byte). On the wire everything is ``uint8``, which
gloo and NCCL both carry.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): a rank adds its residual to the buffer before
encoding and keeps what encoding lost, so what the codec drops is sent in later steps instead of never. The
second half's loss (of the chunk's mean) is kept by the chunk's owner, times ``n``: added to its own
contribution next time, it adds exactly that loss to the next mean. One residual per rank, the buffer's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

BLOCK = 128  # values per int8 / int4 scale: 4 bytes of scale per 128 values costs 1/32 byte per value
CODECS = ("bf16", "int8", "int4")
CPU_SLICE = 1 << 15  # values per pass on the CPU: a slice's temporaries stay in cache and under glibc's mmap threshold
#                      (128 KB of fp32; about 4x faster than passes over a whole bucket); on an accelerator each
#                      call is one pass over the whole buffer


class Scratch:
    """Buffers one caller's buckets share, one after another: a CPU rank then maps fresh pages for its largest
    bucket, not for every bucket (glibc serves large tensors from their own mappings, training.host_memory)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def _slices(values: int, device: torch.device) -> list[tuple[int, int]]:
    step = CPU_SLICE if device.type == "cpu" else max(values, 1)
    return [(start, min(start + step, values)) for start in range(0, values, step)]


@dataclass(frozen=True)
class Codec:
    """Encodes rows of fp32 values (a multiple of ``BLOCK`` per row) into rows of bytes, and back. A row's
    payload is its codes, then (int8, int4) its fp32 block scales."""

    name: str

    @property
    def levels(self) -> int:
        return {"int8": 127, "int4": 7}[self.name]

    def code_bytes(self, values: int) -> int:
        return {"bf16": 2 * values, "int8": values, "int4": values // 2}[self.name]

    def payload_bytes(self, values: int) -> int:
        """Bytes one row of ``values`` values takes on the wire."""
        scales = 0 if self.name == "bf16" else 4 * (values // BLOCK)
        return self.code_bytes(values) + scales

    def encode(self, rows: torch.Tensor, lost: torch.Tensor | None = None, out: torch.Tensor | None = None
               ) -> torch.Tensor:
        """[r, m] fp32 -> [r, payload_bytes(m)] uint8 (into ``out`` when given). With ``lost`` ([r, m] fp32;
        ``rows`` itself is allowed): what the encoding loses, rows - decode(encode(rows)), is written into it."""
        r, m = rows.shape
        if out is None:
            out = torch.empty((r, self.payload_bytes(m)), dtype=torch.uint8, device=rows.device)
        codes_of, scales_of = out[:, :self.code_bytes(m)], out[:, self.code_bytes(m):]
        for start, stop in _slices(m, rows.device):
            piece = rows[:, start:stop]
            codes, scales, decoded = self._encode_piece(piece)
            codes_of[:, self.code_bytes(start):self.code_bytes(stop)] = codes
            if scales is not None:
                scales_of[:, 4 * (start // BLOCK):4 * (stop // BLOCK)] = scales.view(torch.uint8)
            if lost is not None:
                torch.sub(piece, decoded, out=lost[:, start:stop])
        return out

    def _encode_piece(self, piece: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(codes as bytes, scales or None, the values they decode to) of [r, k] fp32."""
        if self.name == "bf16":
            half = piece.to(torch.bfloat16)
            return half.view(torch.uint8), None, half.float()
        r, k = piece.shape
        blocks = piece.reshape(r, k // BLOCK, BLOCK)
        scales = blocks.abs().amax(dim=2) / self.levels
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.round(blocks / scales.unsqueeze(2)).clamp_(-self.levels, self.levels)
        decoded = (codes * scales.unsqueeze(2)).reshape(r, k)
        codes = codes.reshape(r, k)
        if self.name == "int8":
            return codes.to(torch.int8).view(torch.uint8), scales, decoded
        nibbles = (codes + 8).to(torch.uint8)  # two 4-bit codes (1..15) per byte, the even index in the low nibble
        return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scales, decoded

    def decode(self, payload: torch.Tensor, values: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """[r, payload_bytes(values)] uint8 -> [r, values] fp32 (into ``out`` when given)."""
        if out is None:
            out = torch.empty((payload.shape[0], values), dtype=torch.float32, device=payload.device)
        for start, stop in _slices(values, payload.device):
            out[:, start:stop] = self._decode_piece(payload, values, start, stop)
        return out

    def decode_mean(self, payload: torch.Tensor, values: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The mean of the [n, payload_bytes(values)] rows' decoded values, [values] fp32 (into ``out`` when
        given), summed in row order."""
        if out is None:
            out = torch.empty(values, dtype=torch.float32, device=payload.device)
        for start, stop in _slices(values, payload.device):
            pieces = self._decode_piece(payload, values, start, stop)
            total = out[start:stop]
            total.copy_(pieces[0])
            for row in pieces[1:]:
                total += row
        return out.div_(payload.shape[0])

    def _decode_piece(self, payload: torch.Tensor, values: int, start: int, stop: int) -> torch.Tensor:
        """Values ``start:stop`` of every row, [r, stop - start] fp32."""
        codes = payload[:, self.code_bytes(start):self.code_bytes(stop)]
        if self.name == "bf16":
            return codes.contiguous().view(torch.bfloat16).float()
        r, k = payload.shape[0], stop - start
        scales_at = self.code_bytes(values) + 4 * (start // BLOCK)
        scales = payload[:, scales_at:scales_at + 4 * (k // BLOCK)].contiguous().view(torch.float32)
        if self.name == "int8":
            codes = codes.contiguous().view(torch.int8).float()
        else:
            codes = torch.stack([codes & 15, codes >> 4], dim=2).reshape(r, k).float() - 8
        return (codes.view(r, k // BLOCK, BLOCK) * scales.unsqueeze(2)).reshape(r, k)


def padded_chunk(numel: int, ranks: int) -> int:
    """Values per rank's chunk: the buffer padded to ``ranks`` chunks of whole blocks."""
    per_rank = -(-numel // ranks)
    return -(-per_rank // BLOCK) * BLOCK


def compressed_mean_(flat: torch.Tensor, group: dist.ProcessGroup | None, codec: Codec,
                     residual: torch.Tensor | None = None, scratch: Scratch | None = None) -> None:
    """Replace ``flat`` (1-D fp32, the same size on every rank of ``group``) by the mean over ``group`` through
    ``codec``; with ``residual`` (fp32, ``flat``'s size, this rank's), error feedback: it is added first and
    then holds what this rank's encodings lost. Its buffers come from ``scratch`` when given. Collective."""
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    numel, chunk = flat.numel(), padded_chunk(flat.numel(), ranks)
    scratch, device, payload = scratch or Scratch(), flat.device, codec.payload_bytes(chunk)
    values = scratch.take("values", (ranks * chunk,), torch.float32, device)
    values[numel:] = 0
    if residual is not None:
        torch.add(flat, residual, out=values[:numel])
    else:
        values[:numel] = flat
    rows = values.view(ranks, chunk)
    sent = codec.encode(rows, lost=rows if residual is not None else None,  # rows now hold what encoding lost
                        out=scratch.take("sent", (ranks, payload), torch.uint8, device))
    received = scratch.take("received", (ranks, payload), torch.uint8, device)
    dist.all_to_all_single(received, sent, group=group)
    mean = codec.decode_mean(received, chunk,  # fp32, in rank order: equal on every run
                             out=scratch.take("mean", (chunk,), torch.float32, device))
    own = codec.encode(mean.unsqueeze(0), lost=mean.unsqueeze(0) if residual is not None else None,
                       out=scratch.take("own", (1, payload), torch.uint8, device))
    if residual is not None:
        rows[rank] += mean.mul_(ranks)
        residual.copy_(values[:numel])
    gathered = scratch.take("received", (ranks, payload), torch.uint8, device)
    dist.all_gather_into_tensor(gathered, own, group=group)
    codec.decode(gathered, chunk, out=rows)
    flat.copy_(values[:numel])


def compressed_scatter_mean_(flat: torch.Tensor, owned: list[list[tuple[int, int]]], group: dist.ProcessGroup | None,
                             codec: Codec, residual: torch.Tensor | None = None) -> None:
    """The reduce-scatter half alone, as ZeRO needs it: ``owned[r]`` lists the (offset, length) ranges of ``flat``
    (the same on every rank) that rank ``r`` keeps; each rank's own ranges of ``flat`` become the mean over
    ``group``, the rest keep this rank's values. Every value is encoded once (for its owner, in the owner's
    ranges concatenated and padded to whole blocks) and the owner sums the decoded pieces in fp32, in rank
    order. With ``residual`` (fp32, ``flat``'s size) error feedback as in ``compressed_mean_``. Collective."""
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    values = flat.to(torch.float32, copy=True).view(-1)
    if residual is not None:
        values += residual
    lengths = [-(-sum(n for _, n in ranges) // BLOCK) * BLOCK for ranges in owned]
    pieces = [_gathered(values, ranges, length) for ranges, length in zip(owned, lengths)]
    encoded = [codec.encode(piece.unsqueeze(0), lost=piece.unsqueeze(0) if residual is not None else None)
               for piece in pieces]
    received = torch.empty(ranks * codec.payload_bytes(lengths[rank]), dtype=torch.uint8, device=flat.device)
    dist.all_to_all_single(received, torch.cat([e.view(-1) for e in encoded]), group=group,
                           output_split_sizes=[codec.payload_bytes(lengths[rank])] * ranks,
                           input_split_sizes=[e.numel() for e in encoded])
    mean = codec.decode_mean(received.view(ranks, codec.payload_bytes(lengths[rank])), lengths[rank])
    if residual is not None:
        for ranges, piece in zip(owned, pieces):  # each piece now holds what its encoding lost
            _scatter(residual, ranges, piece)
    _scatter(flat.view(-1), owned[rank], mean)


def _gathered(values: torch.Tensor, ranges: list[tuple[int, int]], length: int) -> torch.Tensor:
    """The ``ranges`` of ``values`` one after another, zero-padded to ``length``."""
    out = torch.zeros(length, dtype=values.dtype, device=values.device)
    position = 0
    for offset, n in ranges:
        out[position:position + n] = values[offset:offset + n]
        position += n
    return out


def _scatter(target: torch.Tensor, ranges: list[tuple[int, int]], source: torch.Tensor) -> None:
    """Write ``source`` (the ranges one after another, maybe padded) back into ``target``'s ``ranges``."""
    position = 0
    for offset, n in ranges:
        target[offset:offset + n] = source[position:position + n]
        position += n
