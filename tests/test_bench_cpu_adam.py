"""bench cpu_adam: the candidates are timed on the same start and compared; bad input is one line."""

from __future__ import annotations

import pytest
import torch

from bench.cpu_adam import _candidates, main, report, time_optimizer

pytestmark = pytest.mark.unit


def test_torch_candidates_reach_the_same_weights_and_the_report_names_them():
    candidates = _candidates()
    seconds, foreach = time_optimizer(candidates["torch AdamW (foreach)"], 4096, steps=3, warmup=1)
    _, fused = time_optimizer(candidates["torch AdamW (fused)"], 4096, steps=3, warmup=1)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    # 4 AdamW steps from the same weights and gradient: only the kernels' rounding differs (fp32)
    torch.testing.assert_close(fused, foreach, rtol=0, atol=1e-6)
    one_step = time_optimizer(candidates["torch AdamW (foreach)"], 4096, steps=1, warmup=0)[1]
    assert not torch.equal(one_step, foreach)  # every step moves the weights
    text = report({"machine": {"cpu": "x", "cores": 2, "torch": "t", "date": "d"}, "params": 4096, "steps": 3,
                   "warmup": 1, "threads": 2,
                   "rows": [{"optimizer": "a", "status": "ok", "step_s": 0.5, "vs_first": 1.0, "params_per_s": 8192.0,
                             "max_abs_diff_vs_first": 0.0},
                            {"optimizer": "b", "status": "failed: ImportError: no"}]})
    assert "| a | 0.5000 | 1.00 |" in text and "| b | failed: ImportError: no |" in text


def test_bad_sizes_are_one_line():
    with pytest.raises(SystemExit, match="--params, --steps and --threads must be positive"):
        main(["--params", "0"])

