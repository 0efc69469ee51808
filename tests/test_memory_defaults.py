"""Memory defaults (issue 30 point 4): glibc returns freed tensors to the system in CPU ranks."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

# A freed 20 MB tensor raises glibc's dynamic mmap threshold to 20 MB (and its trim threshold to 40 MB), so
# that a later 8 MB tensor comes from the heap, which keeps it resident when freed. With the fixed 256 KB
# threshold both are mappings of their own, returned when freed. A user's threshold (16 MB here) puts the 8 MB
# tensor in the heap too.
FREED_8MB_TENSOR = textwrap.dedent("""
    import sys
    import torch
    from training import host_memory

    def anonymous():
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) * 1024 for l in status if l.startswith("RssAnon:"))

    applied = host_memory.release_freed_tensors(sys.argv[1]) if sys.argv[1] != "-" else False
    torch.ones(5 * 2**20).sum()  # 20 MB, freed
    before = anonymous()
    tensor = torch.ones(2 * 2**20)  # 8 MB
    after = torch.ones(2**18)  # 1 MB above it in the heap: glibc cannot trim the heap's top either
    del tensor
    print(applied, (anonymous() - before - after.nbytes) / 2**20)
""")


def _kept_mb(device: str, **env) -> tuple[bool, float]:
    environment = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", FREED_8MB_TENSOR, device], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**environment, **env}, check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_cpu_rank_returns_a_freed_tensor_to_the_system():
    assert _kept_mb("cpu") == (True, pytest.approx(0, abs=1))
    without = _kept_mb("-")  # glibc's dynamic threshold: the 8 MB stay resident
    assert not without[0] and without[1] > 7
    assert _kept_mb("cuda") == (False, pytest.approx(without[1], abs=1))  # host memory of GPU runs: untouched
    users = _kept_mb("cpu", MALLOC_MMAP_THRESHOLD_=str(16 * 2**20))  # the user's own threshold stays
    assert not users[0] and users[1] > 7
