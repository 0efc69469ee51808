"""Host memory that follows the live tensors: glibc's malloc told to return freed tensors to the system.

glibc serves blocks above its mmap threshold with their own mapping, returned to the system when freed; below
it, from the heap, which keeps freed memory resident. The threshold starts at 128 KB and, by default, rises to
the size of every larger block freed, up to 32 MB: after the first large tensor is freed, every freed tensor
under 32 MB stays in the heap, and a CPU rank's resident memory carries the high-water mark of everything it
ever freed (1.28-1.49x the model state where 1.06-1.27x are live, docs/benchmarks.md). A fixed threshold of
256 KB (what ``MALLOC_MMAP_THRESHOLD_=262144`` sets at startup, here set through ``mallopt`` because glibc reads
that variable only when the process starts) keeps the heap to small objects.

CPU runs only: there the model state, gradients and activations all live in host memory. On an accelerator
the host heap holds data batches and checkpoint pieces in transit, one tensor at a time, so what glibc keeps is
bounded by one tensor, while a mapping per host allocation above 256 KB would cost a system call and fresh
zeroed pages for every batch and staging copy.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 256 * 1024
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


def release_freed_tensors(device: str) -> bool:
    """On a CPU run under glibc, fix malloc's mmap threshold at 256 KB unless the user set one; True when set.
    Idempotent; call early in every rank."""
    if device != "cpu" or user_set_threshold():
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
