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

from dataclasses import dataclass

import torch
import torch.distributed as dist

BLOCK = 128  # values per int8 / int4 scale: 4 bytes of scale per 128 values costs 1/32 byte per value
CODECS = ("bf16", "int8", "int4")


@dataclass(frozen=True)
class Codec:
    """Encodes rows of fp32 values (a multiple of ``BLOCK`` per row) into rows of bytes, and back."""

    name: str

    @property
    def levels(self) -> int:
        return {"int8": 127, "int4": 7}[self.name]

    def payload_bytes(self, values: int) -> int:
        """Bytes one row of ``values`` values takes on the wire."""
        if self.name == "bf16":
            return 2 * values
        code_bytes = values if self.name == "int8" else values // 2
        return code_bytes + 4 * (values // BLOCK)

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """[r, m] fp32 -> [r, payload_bytes(m)] uint8."""
        if rows.shape[1] == 0:  # a rank that owns nothing of a bucket
            return torch.empty((rows.shape[0], 0), dtype=torch.uint8, device=rows.device)
        if self.name == "bf16":
            return rows.to(torch.bfloat16).view(torch.uint8)
        r, m = rows.shape
        blocks = rows.reshape(r, m // BLOCK, BLOCK)
        scales = blocks.abs().amax(dim=2) / self.levels
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.round(blocks / scales.unsqueeze(2)).clamp_(-self.levels, self.levels).reshape(r, m)
        if self.name == "int8":
            packed = codes.to(torch.int8).view(torch.uint8)
        else:  # two 4-bit codes (offset by 8 into 1..15) per byte, the even index in the low nibble
            nibbles = (codes + 8).to(torch.uint8)
            packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        return torch.cat([packed, scales.contiguous().view(torch.uint8)], dim=1)

    def decode(self, payload: torch.Tensor, values: int) -> torch.Tensor:
        """[r, payload_bytes(values)] uint8 -> [r, values] fp32."""
        if values == 0:
            return torch.empty((payload.shape[0], 0), dtype=torch.float32, device=payload.device)
        if self.name == "bf16":
            return payload.contiguous().view(torch.bfloat16).float()
        r = payload.shape[0]
        code_bytes = values if self.name == "int8" else values // 2
        scales = payload[:, code_bytes:].contiguous().view(torch.float32)
        packed = payload[:, :code_bytes]
        if self.name == "int8":
            codes = packed.contiguous().view(torch.int8).float()
        else:
            codes = torch.stack([packed & 15, packed >> 4], dim=2).reshape(r, values).float() - 8
        return (codes.view(r, values // BLOCK, BLOCK) * scales.unsqueeze(2)).reshape(r, values)


def padded_chunk(numel: int, ranks: int) -> int:
    """Values per rank's chunk: the buffer padded to ``ranks`` chunks of whole blocks."""
    per_rank = -(-numel // ranks)
    return -(-per_rank // BLOCK) * BLOCK


def compressed_mean_(flat: torch.Tensor, group: dist.ProcessGroup | None, codec: Codec,
                     residual: torch.Tensor | None = None) -> None:
    """Replace ``flat`` (1-D fp32, the same size on every rank of ``group``) by the mean over ``group`` through
    ``codec``; with ``residual`` (fp32, ``flat``'s size, this rank's), error feedback: it is added first and
    then holds what this rank's encodings lost. Collective over ``group``."""
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    numel, chunk = flat.numel(), padded_chunk(flat.numel(), ranks)
    values = torch.zeros(ranks * chunk, dtype=torch.float32, device=flat.device)
    values[:numel] = flat
    if residual is not None:
        values[:numel] += residual
    sent = codec.encode(values.view(ranks, chunk))
    received = torch.empty_like(sent)
    dist.all_to_all_single(received, sent, group=group)
    mean = codec.decode(received, chunk).sum(dim=0) / ranks  # fp32, in rank order: equal on every run
    own = codec.encode(mean.unsqueeze(0))
    if residual is not None:
        lost = values.view(ranks, chunk).sub_(codec.decode(sent, chunk))
        lost[rank] += ranks * (mean - codec.decode(own, chunk)[0])
        residual.copy_(lost.view(-1)[:numel])
    del sent, received, values
    gathered = torch.empty((ranks, own.shape[1]), dtype=torch.uint8, device=flat.device)
    dist.all_gather_into_tensor(gathered, own, group=group)
    flat.copy_(codec.decode(gathered, chunk).view(-1)[:numel])


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
    encoded = [codec.encode(piece.unsqueeze(0)) for piece in pieces]
    received = torch.empty(ranks * codec.payload_bytes(lengths[rank]), dtype=torch.uint8, device=flat.device)
    dist.all_to_all_single(received, torch.cat([e.view(-1) for e in encoded]), group=group,
                           output_split_sizes=[codec.payload_bytes(lengths[rank])] * ranks,
                           input_split_sizes=[e.numel() for e in encoded])
    mean = codec.decode(received.view(ranks, codec.payload_bytes(lengths[rank])), lengths[rank]).sum(dim=0) / ranks
    if residual is not None:
        for ranges, piece, payload, length in zip(owned, pieces, encoded, lengths):
            _scatter(residual, ranges, piece - codec.decode(payload, length)[0])
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
