"""The chunked output layer + cross entropy (``parallel.chunked_cross_entropy``, ``modeling.losses.token_losses``)
against references that share no code with colonnade: ``torch.nn.functional.cross_entropy`` on full fp64 logits,
and transformers' own loss (``labels=``) of the model.

Tolerance: 1e-6 relative (2-norm) for fp32 inputs against the fp64 reference. The chunked path rounds what the
unchunked fp32 path rounds (fp32 logits, unit roundoff 6e-8) and sums in another order: over at most a few
thousand terms per value (the vocabulary in the log-sum-exp, the tokens in grad_W) the accumulated rounding
measured here is 4e-8 (loss) to 3e-7 (gradients); the mutations below miss by more than 1e-2. In fp64 the same
comparisons hold to 1e-12 (the algorithm is exact; only rounding differs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import parallel.chunked_cross_entropy as chunked
from tests.dist import run_ranks

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm())


def _problem(tokens=300, vocab=1000, hidden=48, seed=0):
    """Hidden states, weight, bias, targets (every 7th ignored), an incoming gradient that is not 1."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(tokens, hidden, generator=g, dtype=torch.float64), torch.randn(vocab, hidden, generator=g,
                                                                                       dtype=torch.float64) * 0.3
    b = torch.randn(vocab, generator=g, dtype=torch.float64)
    t = torch.randint(0, vocab, (tokens,), generator=g)
    t[::7] = -100
    return x, w, b, t, torch.rand(tokens, generator=g, dtype=torch.float64)


def _reference(x, w, b, t, grad, scale=1.0, softcap=None):
    """(loss, grad_x, grad_w, grad_b) of plain torch on full fp64 logits."""
    x, w, b = (v.double().clone().requires_grad_() for v in (x, w, b))
    z = (x @ w.t() + b) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, t, reduction="none", ignore_index=-100)
    (loss * grad).sum().backward()
    return loss.detach(), x.grad, w.grad, b.grad


def _chunked(x, w, b, t, grad, dtype, **kwargs):
    x, w, b = (v.to(dtype).clone().requires_grad_() for v in (x, w, b))
    loss = chunked.chunked_head_cross_entropy(x, w, t, b, **kwargs)
    (loss.double() * grad).sum().backward()
    return loss.detach(), x.grad, w.grad, b.grad


def _assert_equal(got, ref, tol):
    for name, a, r in zip(("loss", "grad_hidden", "grad_W", "grad_bias"), got, ref):
        assert _rel(a, r) <= tol, (name, _rel(a, r))


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("scale, softcap", [(1.0, None), (0.5, 3.0), (0.25, None)],
                         ids=["plain", "softcap", "scale"])
def test_one_rank_equals_full_logits(dtype, scale, softcap):
    # 300 tokens in chunks of 64 (the last 44), 1,000 rows in slabs of 300 (the last 100), bias, ignored targets
    x, w, b, t, grad = _problem()
    ref = _reference(x, w, b, t, grad, scale, softcap)
    got = _chunked(x, w, b, t, grad, dtype, chunk_tokens=64, slab_rows=300, scale=scale, softcap=softcap)
    _assert_equal(got, ref, TOL[dtype])
    assert torch.all(got[0][t == -100] == 0)


@pytest.mark.unit
def test_bf16_weight_gradient_is_summed_in_fp32():
    # 32 chunks: a bf16 running sum would round 32 times; the fp32 sum stays within a few bf16 roundings
    x, w, b, t, grad = _problem(tokens=2048, vocab=512, hidden=32)
    ref = _reference(x, w, b, t, grad)
    got = _chunked(x, w, b, t, grad, torch.bfloat16, chunk_tokens=64)
    assert _rel(got[2], ref[2]) < 1e-2


@pytest.mark.unit
@pytest.mark.parametrize("mutation", ["lse of another chunk", "grad_W not accumulated"])
def test_mutations_fail_the_comparison(monkeypatch, mutation):
    x, w, b, t, grad = _problem()
    ref = _reference(x, w, b, t, grad)
    if mutation == "lse of another chunk":
        original = chunked._block_grad
        monkeypatch.setattr(chunked, "_block_grad", lambda z, lse, *rest: original(z, lse.roll(1), *rest))
    else:
        monkeypatch.setattr(chunked, "_add_product", lambda out, a, b: out.copy_(a @ b))
    got = _chunked(x, w, b, t, grad, torch.float64, chunk_tokens=64, slab_rows=300)
    assert max(_rel(a, r) for a, r in zip(got[1:3], ref[1:3])) > 1e-2


def _tensor_parallel(vocab: int, bias: bool) -> list[float]:
    """Rank function: this rank's (padded) vocabulary rows, the three all-reduces; grad_hidden summed over the
    ranks as the head's region entry does; grad_W and grad_b gathered whole."""
    import torch.distributed as dist

    from training.lifecycle import init_distributed

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    x, w, b, t, grad = _problem(tokens=130, vocab=vocab, hidden=24)
    b = b if bias else torch.zeros_like(b)
    ref = _reference(x, w, b, t, grad)
    local = -(-vocab // world)  # rows per rank, the last rank's padded
    start, valid = rank * local, max(0, min(local, vocab - rank * local))
    pad = torch.zeros(local - valid, w.shape[1], dtype=w.dtype)
    rows = [torch.cat([w[start:start + valid], pad]), torch.cat([b[start:start + valid], pad[:, 0]])]
    xs, ws, bs = (v.float().clone().requires_grad_() for v in (x, rows[0], rows[1]))
    loss = chunked.chunked_head_cross_entropy(xs, ws, t, bs if bias else None, chunk_tokens=48, group=dist.group.WORLD,
                                              vocab_start=start, valid=valid, slab_rows=40)
    (loss.double() * grad).sum().backward()
    dist.all_reduce(xs.grad)
    assert torch.all(ws.grad[valid:] == 0)  # padded rows
    gathered_w = [torch.empty_like(ws.grad) for _ in range(world)]
    dist.all_gather(gathered_w, ws.grad.contiguous())
    errors = [_rel(loss, ref[0]), _rel(xs.grad, ref[1]), _rel(torch.cat(gathered_w)[:vocab], ref[2])]
    if bias:
        gathered_b = [torch.empty_like(bs.grad) for _ in range(world)]
        dist.all_gather(gathered_b, bs.grad.contiguous())
        errors.append(_rel(torch.cat(gathered_b)[:vocab], ref[3]))
    return errors


@pytest.mark.multiprocess
@pytest.mark.parametrize("vocab, bias", [(300, True), (301, False)], ids=["even-bias", "padded"])
def test_two_tensor_ranks_equal_full_logits(vocab, bias):
    # 130 tokens in chunks of 48 (the last 34); 150 or 151 rows per rank in slabs of 40, rank 1's last row padded
    for errors in run_ranks(_tensor_parallel, 2, vocab, bias, timeout=300):
        assert max(errors) <= TOL[torch.float32], errors


def _tiny(arch: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **sizes, **extra)).double().eval()


@pytest.mark.unit
@pytest.mark.parametrize("arch, extra, verdict", [
    ("llama", {}, "chunked"), ("gemma2", {"final_logit_softcapping": 3.0}, "chunked"),
    ("cohere", {"logit_scale": 0.5}, "chunked"), ("granite", {"logits_scaling": 4.0}, "chunked"),
    ("llama", {"unknown": True}, "full")])
def test_token_losses_equal_the_models_own_loss(monkeypatch, arch, extra, verdict):
    # the model's own loss (labels=) is the reference; "unknown": a forward that changes its logits in a way
    # colonnade does not know (here +1 on token 0) must fall back to the full logits, not be silently dropped
    import copy

    from modeling.losses import mean_loss, next_token_targets, token_losses

    unknown = extra.pop("unknown", False)
    model = _tiny(arch, **extra)
    if unknown:
        inner = type(model).forward

        def shifted(self, *args, **kwargs):
            out = inner(self, *args, **kwargs)
            out.logits = out.logits.clone().index_add_(-1, torch.tensor([0]), torch.ones_like(out.logits[..., :1]))
            return out

        monkeypatch.setattr(type(model), "forward", shifted)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    targets = next_token_targets(ids)
    for _ in range(2):  # the checked call, then the next
        model.zero_grad()
        losses, _ = token_losses(model, lambda: model(input_ids=ids, use_cache=False), targets, chunk_tokens=7)
        loss = mean_loss(losses, targets)
        loss.backward()
    head = model.get_output_embeddings()
    assert head.chunked_loss_check == verdict
    expected = reference(input_ids=ids, labels=ids)
    if unknown:  # transformers' loss reads the changed logits too
        expected.loss = F.cross_entropy(expected.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    expected.loss.backward()
    assert abs(float(loss) - float(expected.loss)) <= 1e-6 * float(expected.loss)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert _rel(p.grad, q.grad) <= 1e-6, name


@pytest.mark.unit
def test_bench_loss_at_a_tiny_size(tmp_path):
    from bench import loss

    result = loss.run(vocab=2048, tokens=512, hiddens=[32], chunks=[64], check=(64, 300, 16, 24))
    assert {r["dtype"] for r in result["rows"]} == {"fp32", "bf16"}
    assert all(r["ratio"] < 0.5 for r in result["rows"]), result["rows"]
    assert max(result["check"]["rel"].values()) <= 1e-6
    assert "| 32 | fp32 | 64 |" in loss.report(result)
