import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The tiers (docs/tests.md): every test carries exactly one, set per module with ``pytestmark``.
TIERS = {
    "unit": "in the pytest process only: launches no process",
    "multiprocess": "launches ranks through tests/dist.py (forked from the preloaded server), no fresh interpreter",
    "subprocess": "starts fresh interpreters: train.py, torchrun, deepspeed, python -m bench, python -c",
}
_INTERPRETERS = ("python", "torchrun", "deepspeed")


def pytest_collection_modifyitems(config, items):
    wrong = []
    for item in items:
        tiers = [mark.name for mark in item.iter_markers() if mark.name in TIERS]
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(tiers) or 'none'}")
    if wrong:
        raise pytest.UsageError("every test carries exactly one tier marker (" + ", ".join(TIERS)
                                + "; docs/tests.md):\n  " + "\n  ".join(wrong))


@pytest.fixture(autouse=True)
def _tier_holds(request, monkeypatch):
    """A unit test that launches a process, or a multiprocess test that starts an interpreter, fails: the
    tier says what the test costs, and ``make test-fast`` selects by it."""
    tier = next((mark.name for mark in request.node.iter_markers() if mark.name in TIERS), None)
    if tier not in ("unit", "multiprocess"):
        return
    popen = subprocess.Popen.__init__

    def guarded_popen(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        program = os.path.basename(str(argv[0]).split()[0]) if argv else ""
        if program.startswith(_INTERPRETERS) or str(argv[0]) == sys.executable:
            raise AssertionError(f"a {tier} test started {program}: mark its module subprocess")
        popen(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_popen)
    if tier == "unit":
        import multiprocessing.process

        def no_process(self):
            raise AssertionError("a unit test launched a process: mark its module multiprocess")

        monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", no_process)
