"""What the fork server of ``tests/dist.py`` imports once for every rank it forks (see its docstring).

``training`` first: it picks DeepSpeed's CPU accelerator. Then the libraries, every module of ``parallel``,
``modeling`` and ``training``, the model classes the tests build and ``tests.helpers``. A module that fails to
import is skipped (the rank imports what it needs itself and reports the error, as a spawned rank does).
DeepSpeed's shared-memory op is loaded here too: each rank's process group start would otherwise run ninja on
it under a file lock, which a rank killed mid-check leaves behind for every later run to wait on.
"""

import contextlib
import importlib
import io
import pkgutil
import sys


def _load(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception:  # a module being moved or rewritten: the rank's own import reports it
        pass


for _name in ("training", "deepspeed", "transformers", "datasets", "transformers.models.gpt2.modeling_gpt2",
              "transformers.models.llama.modeling_llama", "transformers.models.t5.modeling_t5",
              "transformers.models.marian.modeling_marian"):
    _load(_name)
for _package in ("parallel", "modeling", "training"):
    try:
        _path = importlib.import_module(_package).__path__
    except Exception:
        continue
    for _module in pkgutil.walk_packages(_path, _package + "."):
        _load(_module.name)
_load("tests.helpers")

try:
    from deepspeed.comm.torch import build_shm_op

    with contextlib.redirect_stdout(io.StringIO()):  # its "built successfully" is no rank's output
        build_shm_op()
except Exception:  # no compiler: every rank builds or skips it as before
    pass
sys.stdout.flush()  # nothing of the server's left in a buffer that every forked rank would write out
sys.stderr.flush()
