"""The single-process reference shares no data order, schedule or loss with colonnade: a bug planted in each
of those pieces of colonnade makes the parity check fail, and the unmutated run passes it."""

from __future__ import annotations

import pytest

from tests.dist import run_ranks
from tests.helpers import reference_losses, run_config, step_records, tiny_config, write_corpus

pytestmark = pytest.mark.multiprocess

LOSS_TOL = 1e-4  # the parity tests' tolerance (test_zero_parity)


def _shifted_epoch_seed(self, position):
    """Data-order bug: the epoch permutation seeded with ``seed + epoch`` instead of the documented rule."""
    import torch

    epoch, offset = divmod(position, self.num_blocks)
    return int(torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(self.seed + epoch))[offset])


def _warmup_from_zero(optim, total_steps):
    """Schedule bug: warm-up multiplier step / warmup (0 at step 0) instead of (step + 1) / warmup."""
    correct = _ORIGINALS["lr_lambda"](optim, total_steps)
    return lambda step: step / optim.warmup_steps if step < optim.warmup_steps else correct(step)


def _mean_over_all_positions(losses, targets):
    """Loss-reduction bug: the summed next-token loss divided by every position, the last (unpredicted) one
    included."""
    seq_len = targets.shape[1]
    return _ORIGINALS["mean_loss"](losses, targets) * (seq_len - 1) / seq_len


_ORIGINALS = {}


def _train_with(cfg, mutation: str | None):
    """Rank function: train ``cfg`` with one of colonnade's pieces replaced by a planted bug."""
    import training.data as data
    import training.engine as engine
    import training.tasks.causal_lm as causal_lm

    _ORIGINALS.update(lr_lambda=engine.lr_lambda, mean_loss=causal_lm.mean_loss)
    if mutation == "data order":
        data.GlobalOrder.__getitem__ = _shifted_epoch_seed
    elif mutation == "lr schedule":
        engine.lr_lambda = _warmup_from_zero
    elif mutation == "loss reduction":
        causal_lm.mean_loss = _mean_over_all_positions
    return run_config(cfg)


def _worst_relative(got: list[float], expected: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(got, expected))


@pytest.mark.parametrize("mutation", [None, "data order", "lr schedule", "loss reduction"])
def test_a_bug_in_a_shared_piece_fails_the_parity_check(tmp_path, mutation):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "run", corpus, train__grad_accum=2)
    ref_loss, ref_norm = reference_losses(cfg, global_batch=2 * 2)
    history = run_ranks(_train_with, 1, cfg, mutation, timeout=300)[0]
    losses = [r["loss"] for r in step_records(history)]
    norms = [r["grad_norm"] for r in step_records(history)]
    worst = max(_worst_relative(losses, ref_loss), _worst_relative(norms, ref_norm))
    if mutation is None:
        assert worst < LOSS_TOL, f"the correct run is {worst:.2e} from the reference"
    else:
        # Measured (loss or grad norm, worst step): data order 7.8e-2, warm-up from zero 2.2e-1, loss over all
        # positions 3.1e-2 (1/32); the correct run 2.4e-7.
        assert worst > 10 * LOSS_TOL, f"{mutation}: the planted bug is only {worst:.2e} from the reference"
