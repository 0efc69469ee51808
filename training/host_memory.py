"""Host memory that follows the live tensors: glibc's malloc told to return freed tensors to the system.

glibc serves blocks above its mmap threshold with their own mapping, returned to the system when freed; below
it, from the heap, which keeps freed memory resident. The threshold starts at 128 KB and, by default, rises to
the size of every larger block freed, up to 32 MB: after the first large tensor is freed, every freed tensor
under 32 MB stays in the heap, and a CPU rank's resident memory carries the high-water mark of everything it
ever freed (1.28-1.49x the model state where 1.06-1.27x are live, docs/benchmarks.md). A fixed threshold of
256 KB (what ``MALLOC_MMAP_THRESHOLD_=262144`` sets at startup, here set through ``mallopt`` because glibc reads
that variable only when the process starts) keeps the heap to small objects.

Ranks holding at least ``LARGE_RANK_BYTES`` of parameters only: every tensor above the threshold is then a
fresh mapping whose pages the kernel zeroes, which costs a small model's step more than its heap ever keeps
(the quickstart, 1.4 M parameters: 0.41 s a step instead of 0.27 s on the 2-core box, 2026-12-06), while a
large model's step is long beside it and its heap's high-water mark is gigabytes (the llama demo).

CPU runs only: there the model state, gradients and activations all live in host memory. On an accelerator
the host heap holds data batches and checkpoint pieces in transit, one tensor at a time, so what glibc keeps is
bounded by one tensor, while a mapping per host allocation above 256 KB would cost a system call and fresh
zeroed pages for every batch and staging copy.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MMAP_THRESHOLD = 256 * 1024
LARGE_RANK_BYTES = 256 * 2**20  # this rank's parameters (about 64 M in fp32: over 1 GiB of training state)
M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version  # absent from musl and other C libraries
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc


def user_set_threshold() -> bool:
    """The user chose glibc's mmap threshold (the environment variable or its tunable): theirs stays."""
    return "MALLOC_MMAP_THRESHOLD_" in os.environ or (
        "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""))


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters a rank holds: its tensor-parallel shard (with pipelines its stages'; the rest is
    on the meta device), unpartitioned under ZeRO-3."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters()
               if p.device.type != "meta")


def applies(device: str, parameter_bytes: int) -> bool:
    """Whether colonnade fixes the threshold for a rank on ``device`` holding ``parameter_bytes``."""
    return device == "cpu" and parameter_bytes >= LARGE_RANK_BYTES and not user_set_threshold()


def release_freed_tensors(device: str, parameter_bytes: int) -> bool:
    """On a CPU rank holding ``parameter_bytes`` >= ``LARGE_RANK_BYTES`` of parameters under glibc, fix malloc's
    mmap threshold at 256 KB unless the user set one; True when set. Idempotent; call once the rank's share of
    the model is built."""
    if not applies(device, parameter_bytes):
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
