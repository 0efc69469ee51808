"""What the fork server of ``bench.coverage_ranks`` imports once for every rank it forks: colonnade (``training``
first: it picks DeepSpeed's CPU accelerator), the libraries, and DeepSpeed's shared-memory op (each rank's process
group start would otherwise run ninja on it under a file lock). The modeling modules of the model types being
covered are named in the server's preload list beside this module."""

import contextlib
import importlib
import io
import sys

for _name in ("training", "deepspeed", "transformers", "datasets", "training.loop", "training.assembly",
              "training.pipeline", "modeling.tensor_parallel", "modeling.pipeline", "modeling.experts",
              "parallel.experts", "deepspeed.moe.layer", "bench.coverage_ranks"):
    try:
        importlib.import_module(_name)
    except Exception:  # a module being rewritten: the rank imports it itself and reports the error
        pass

try:
    from deepspeed.comm.torch import build_shm_op

    with contextlib.redirect_stdout(io.StringIO()):  # its "built successfully" is no rank's output
        build_shm_op()
except Exception:  # no compiler: every rank builds or skips it as before
    pass
sys.stdout.flush()
sys.stderr.flush()
