"""Ring attention (``parallel.ring_attention``) against plain full-sequence attention written here: at 2 and 4
gloo ranks, each holding the load-balanced part of the sequence (chunks r and 2N-1-r of 2N), the output and
the gradients of query, key and value equal the reference's rows for that rank's tokens, for causal
attention, grouped-query attention (4 query heads over 2 and over 1 kv head), sliding windows shorter and
longer than a chunk, document ids, tokens held in a shuffled order, and rings over subgroups (at 4 ranks).
fp32 against an fp64 reference: the ring only reassociates the softmax sums (blockwise, merged by
log-sum-exp, ~1e-7 relative) on top of fp32 rounding of inputs and products; measured <= 6.6e-7 (max error /
max value), so 1e-5 is ~15x the error and far below a mask or merge mistake (the off-by-one window mutation
below misses by 0.78). The module mixes tiers: each test carries its own."""

from __future__ import annotations

import math

import pytest
import torch

from tests.dist import run_ranks

TOL = 1e-5
BATCH, SEQ, HEAD_DIM = 2, 64, 8
SCALING = 1 / math.sqrt(HEAD_DIM)
DOC_LENGTHS = ([20, 30, 14], [37, 27])  # two / three documents, different boundaries per batch row


def _documents() -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in DOC_LENGTHS])


def _cases(chunk: int) -> dict[str, dict]:
    """name -> (kv heads, sliding window, documents?, shuffled order?); windows measured against a chunk."""
    return {
        "causal": dict(kv_heads=4, window=None, docs=False, shuffle=False),
        "gqa 4/2": dict(kv_heads=2, window=None, docs=False, shuffle=False),
        "gqa 4/1": dict(kv_heads=1, window=None, docs=False, shuffle=False),
        "window < chunk": dict(kv_heads=4, window=chunk // 2 + 1, docs=False, shuffle=False),
        "window > chunk": dict(kv_heads=2, window=2 * chunk + 3, docs=False, shuffle=False),
        "documents": dict(kv_heads=2, window=None, docs=True, shuffle=False),
        "documents + window, shuffled": dict(kv_heads=1, window=chunk + 1, docs=True, shuffle=True),
    }


def _full_tensors(kv_heads: int, seed: int) -> list[torch.Tensor]:
    """query, key, value and the upstream weights of the loss, fp64, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(BATCH, 4, SEQ, HEAD_DIM), (BATCH, kv_heads, SEQ, HEAD_DIM), (BATCH, kv_heads, SEQ, HEAD_DIM),
              (BATCH, 4, SEQ, HEAD_DIM)]
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]


def _reference(q, k, v, weights, window, docs):
    """Plain attention over the full sequence: output and the gradients of sum(out * weights)."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    pos = torch.arange(SEQ)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask = mask & (pos[:, None] - pos[None, :] < window)
    mask = mask.expand(BATCH, SEQ, SEQ)
    if docs is not None:
        mask = mask & (docs[:, :, None] == docs[:, None, :])
    scores = SCALING * q @ k.repeat_interleave(group, 1).transpose(-1, -2)
    probs = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), dim=-1)
    out = probs @ v.repeat_interleave(group, 1)
    (out * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _positions(rank: int, world: int, shuffle: bool) -> torch.Tensor:
    """[batch, s_local]: this rank's token positions, chunks rank and 2*world-1-rank (per row shuffled)."""
    chunk = SEQ // (2 * world)
    mine = torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                      torch.arange((2 * world - 1 - rank) * chunk, (2 * world - rank) * chunk)])
    if not shuffle:
        return mine.expand(BATCH, -1)
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.stack([mine[torch.randperm(len(mine), generator=gen)] for _ in range(BATCH)])


def _take(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows ``pos`` [batch, s_local] of the sequence dim (2) of [batch, heads, seq, dim]."""
    return x.gather(2, pos[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _compare(case: dict, pos: torch.Tensor, group, seed: int, window_shift: int = 0,
             tile: int = 1024, balanced: int | None = None) -> dict[str, float]:
    """Errors (max |ring - ref| / max |ref|) of out, dq, dk, dv for this rank's tokens; ``window_shift``
    passes the function a window that differs from the reference's (the mutation)."""
    from parallel.ring_attention import ring_attention

    q, k, v, weights = _full_tensors(case["kv_heads"], seed)
    docs = _documents() if case["docs"] else None
    want = _reference(q, k, v, weights, case["window"], docs)
    ql, kl, vl = (_take(t, pos).float().requires_grad_() for t in (q, k, v))
    doc_local = None if docs is None else docs.gather(1, pos)
    window = None if case["window"] is None else case["window"] + window_shift
    out = ring_attention(ql, kl, vl, pos, pos.clone(), group, SCALING, window, doc_local, doc_local, tile, balanced)
    (out * _take(weights, pos).float()).sum().backward()
    got = [out, ql.grad, kl.grad, vl.grad]
    return {name: _error(g, _take(w, pos)) for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}


def _ring_cases() -> dict[str, dict[str, float]]:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    errors = {}
    for seed, (name, case) in enumerate(_cases(SEQ // (2 * world)).items()):
        errors[name] = _compare(case, _positions(rank, world, case["shuffle"]), group, seed)
    if world == 4:  # rings over the subgroups {0, 2} and {1, 3}: group ranks are not global ranks
        subgroups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        sub = subgroups[rank % 2]
        case = _cases(SEQ // 4)["gqa 4/2"]
        errors["subgroup of 2"] = _compare(case, _positions(dist.get_rank(sub), 2, False), sub, 11)
    for name in ("gqa 4/2", "documents"):  # query tiles of 3 rows: the blocks computed in several uneven pieces
        case = _cases(SEQ // (2 * world))[name]
        errors[f"{name}, tiles of 3"] = _compare(case, _positions(rank, world, False), group, 20, tile=3)
    for name, case in _cases(SEQ // (2 * world)).items():  # the balanced layout's masked halves skipped
        if not case["shuffle"]:
            errors[f"{name}, balanced"] = _compare(case, _positions(rank, world, False), group, 30, tile=5,
                                                   balanced=rank)
    mutated = _cases(SEQ // (2 * world))["window < chunk"]
    errors["mutation: window + 1"] = _compare(mutated, _positions(rank, world, False), group, 0, window_shift=1)
    return errors


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_full_attention(world):
    results = run_ranks(_ring_cases, world, timeout=300)
    for rank, errors in enumerate(results):
        mutation = errors.pop("mutation: window + 1")
        bad = {f"rank {rank} {name} {what}": e for name, errs in errors.items() for what, e in errs.items()
               if not e <= TOL}
        assert not bad, bad
        # the same comparison with the window off by one misses by far more than the tolerance
        assert mutation["out"] > 100 * TOL, mutation


@pytest.mark.unit
@pytest.mark.parametrize("name", ["causal", "gqa 4/1", "window < chunk", "documents + window, shuffled"])
def test_local_attention_without_a_group(name):
    """group None: the whole sequence on one process (shuffled for the last case) through the same math."""
    case = _cases(SEQ // 2)[name]
    errors = _compare(case, _positions(0, 1, case["shuffle"]), None, seed=7)
    assert all(e <= TOL for e in errors.values()), errors


@pytest.mark.unit
def test_gradcheck_in_fp64_and_bf16_dtypes():
    """fp64 inputs are computed in fp64, so autograd's numerical gradcheck holds for the hand-written backward
    (GQA, window, documents; keys one position later than the queries, so the query at position 0 sees no key:
    its output is 0, not NaN); bf16 in, bf16 out and bf16 gradients."""
    from parallel.ring_attention import ring_attention

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    q_pos, k_pos = torch.tensor([[4, 0, 5, 2, 1, 3]]), torch.tensor([[5, 1, 6, 3, 2, 4]])
    docs = torch.tensor([[1, 0, 1, 0, 0, 1]])

    def attend(*qkv):
        return ring_attention(*qkv, q_pos, k_pos, None, 0.7, 3, docs, docs)

    assert torch.autograd.gradcheck(attend, (q, k, v))
    out = attend(q, k, v)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1])) and out.isfinite().all()
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out = attend(*low)
    out.sum().backward()
    assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in low)
