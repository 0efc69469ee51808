"""Dropout under tensor parallelism (``parallel.random``): Megatron's semantics. Masks on data the tensor
ranks split (this rank's attention heads; with sequence parallelism, the sequence chunks) differ between the
ranks; masks on data every rank holds whole agree. Exact resume with dropout on."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.dist import run_ranks
from tests.helpers import TINY_GPT2, run_configs, step_records, tiny_config, write_corpus

pytestmark = pytest.mark.multiprocess


def _masks(sequence_parallel: bool, dropout_seed):
    """Rank function: one training forward of a TP=2 GPT-2 with dropout 0.5; per dropout site, whether its
    mask equals the other rank's."""
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling.tensor_parallel import tensor_parallelize
    from training.lifecycle import init_distributed

    init_distributed()
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=4, n_embd=32, n_positions=16, vocab_size=64,
                                       attn_implementation="eager", resid_pdrop=0.5, embd_pdrop=0.5,
                                       attn_pdrop=0.5))
    model = tensor_parallelize(copy.deepcopy(dense), dist.group.WORLD, sequence_parallel,
                               dropout_seed=dropout_seed).train()
    masks = {}
    sites = {"embedding": model.transformer.drop, "attention output": model.transformer.h[0].attn.resid_dropout}
    for name, module in sites.items():
        module.register_forward_hook(lambda mod, args, out, name=name: masks.__setitem__(name, out == 0))
    dropout = torch.nn.functional.dropout

    def recording(x, *args, **kwargs):  # GPT-2's eager attention drops its probabilities functionally
        out = dropout(x, *args, **kwargs)
        if x.dim() == 4:
            masks["attention probabilities"] = out == 0
        return out

    torch.manual_seed(1)  # every rank draws from the same default state, as after train.seed
    torch.nn.functional.dropout = recording
    try:
        model(input_ids=torch.randint(0, 64, (2, 16)))
    finally:
        torch.nn.functional.dropout = dropout
    same = {}
    for name, mask in masks.items():
        gathered = [torch.empty_like(mask) for _ in range(2)]
        dist.all_gather(gathered, mask.contiguous())
        same[name] = bool(torch.equal(gathered[0], gathered[1]))
    return same


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_split_data_gets_its_own_masks_replicated_data_shared_ones(sequence_parallel):
    same = run_ranks(_masks, 2, sequence_parallel, 7)[0]
    assert not same["attention probabilities"]  # each rank's own heads
    assert same["embedding"]  # before the sequence is split: whole on every rank
    # after the row-parallel layer: whole on every rank, or (sequence parallelism) each rank's own chunk
    assert same["attention output"] is not sequence_parallel


def test_without_the_tensor_parallel_generator_the_heads_share_masks():
    """What the test above catches: the default generator alone gives every rank the same masks."""
    same = run_ranks(_masks, 2, False, None)[0]
    assert same["attention probabilities"]


def test_exact_resume_with_dropout_on_at_tp2(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    gpt2 = dict(TINY_GPT2, n_head=4, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    common = dict(model__config=gpt2, parallel__tensor=2, parallel__sequence_parallel=True, train__steps=6)
    straight = tiny_config(tmp_path / "straight", corpus, train__save_every=3, **common)
    saved = tmp_path / "straight" / "run" / "checkpoints" / "step_0000003"
    resumed = tiny_config(tmp_path / "resumed", corpus, train__resume=str(saved), **common)
    straight_hist, resumed_hist = run_ranks(run_configs, 2, [straight, resumed], timeout=240)[0]
    after = [r["loss"] for r in step_records(straight_hist)[3:]]
    again = [r["loss"] for r in step_records(resumed_hist)]
    # both generators restored: the same masks, the same numbers (the resumed run rebuilds the same state)
    assert again == pytest.approx(after, rel=1e-6)
    assert len(again) == 3
