"""The vocabulary-parallel token choice (``parallel.sampling``) against Hugging Face's logits processors on one
shard, and against itself on one shard when the vocabulary is split over two ranks."""

from __future__ import annotations

import pytest
import torch

from parallel.sampling import (
    Decoding,
    VocabShard,
    choose,
    splitmix64,
    top_k_filter,
    top_p_filter,
    uniform_noise,
    vocab_parallel_argmax,
)
from tests.dist import run_ranks

MASK64 = (1 << 64) - 1


def reference_splitmix64(z: int) -> int:
    """SplitMix64's finaliser (Steele, Lea, Flood 2014) in Python integers."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


@pytest.mark.unit
def test_splitmix64_equals_the_reference_on_int64_wraparound():
    values = [0, 1, 12345, 2**40 + 7, 2**63 - 1, -1, -(2**63)]
    ours = splitmix64(torch.tensor(values))
    assert [int(v) & MASK64 for v in ours] == [reference_splitmix64(v & MASK64) for v in values]


@pytest.mark.unit
def test_noise_is_a_pure_function_of_seed_request_position_and_token():
    vocab = torch.arange(1000)
    a = uniform_noise(7, torch.tensor([3, 4]), torch.tensor([10, 10]), vocab)
    b = uniform_noise(7, torch.tensor([4, 3]), torch.tensor([10, 10]), vocab[500:])
    assert torch.equal(a[1, 500:], b[0]) and torch.equal(a[0, 500:], b[1])  # batch order and shard do not matter
    assert not torch.equal(a, uniform_noise(8, torch.tensor([3, 4]), torch.tensor([10, 10]), vocab))
    assert 0 < float(a.min()) and float(a.max()) < 1
    assert abs(float(a.mean()) - 0.5) < 0.02  # 2,000 draws: the mean's standard error is 0.0065


@pytest.mark.unit
@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
def test_top_p_and_top_k_equal_hugging_face(p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.equal(top_p_filter(logits, p, None).isinf(), TopPLogitsWarper(p)(None, logits.clone()).isinf())
    assert torch.equal(top_k_filter(logits, 20, None), TopKLogitsWarper(20)(None, logits.clone()))


@pytest.mark.unit
def test_greedy_ties_go_to_the_lowest_index_like_argmax():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    assert vocab_parallel_argmax(logits, VocabShard(0, 4)).tolist() == [1, 0]


@pytest.mark.unit
def test_gumbel_max_samples_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    shard, decoding = VocabShard(0, 4), Decoding(temperature=0.8, seed=3)
    draws = torch.stack([choose(logits, shard, decoding, torch.tensor([0]), torch.tensor([n]))
                         for n in range(8000)]).flatten()
    frequency = torch.bincount(draws, minlength=4).double() / len(draws)
    expected = torch.softmax(logits[0].double() / 0.8, -1)
    # 8,000 draws: each frequency's standard error is at most sqrt(0.25 / 8000) = 0.0056; 4 of them is 0.022
    assert torch.allclose(frequency, expected, atol=0.022), (frequency, expected)


def _two_shards(decoding: Decoding, valid_last: int):
    import torch.distributed as dist

    from training.lifecycle import init_distributed

    init_distributed()
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(4)
    full = torch.randn(5, 2 * 300, generator=generator) * 2
    full[:, 300 + valid_last:] = 123.0  # padding rows: must never be chosen
    history = torch.randint(0, 300 + valid_last, (5, 9), generator=generator)
    rows, positions = torch.arange(5) + 11, torch.full((5,), 6)
    whole = choose(full[:, :300 + valid_last], VocabShard(0, 300 + valid_last), decoding, rows, positions, history)
    mine = full[:, rank * 300:(rank + 1) * 300]
    split = choose(mine, VocabShard(rank * 300, 300 if rank == 0 else valid_last, dist.group.WORLD), decoding,
                   rows, positions, history)
    return whole.tolist(), split.tolist()


@pytest.mark.multiprocess
@pytest.mark.parametrize("decoding", [Decoding(repetition_penalty=1.3),
                                      Decoding(temperature=0.8, top_p=0.9, seed=2),
                                      Decoding(temperature=1.2, top_k=7, top_p=0.95, repetition_penalty=1.2, seed=5)],
                         ids=["greedy", "top-p", "top-k-top-p-penalty"])
def test_two_vocabulary_shards_choose_what_one_rank_chooses(decoding):
    for whole, split in run_ranks(_two_shards, 2, decoding, 280, timeout=120):
        assert whole == split
