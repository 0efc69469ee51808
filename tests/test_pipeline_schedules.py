"""Partitioning, the schedule simulator, and the schedules executed over real gloo ranks on HF models:
loss and every gradient equal the single-process model's, for GPipe, 1F1B and interleaved 1F1B."""

from __future__ import annotations

import copy

import pytest
import torch

from parallel.partition import balanced, parse_partition, stage_specs, uniform
from parallel.schedules import ORDERS, check_schedule, render, simulate
from tests.dist import run_ranks


@pytest.mark.unit
def test_partitions():
    assert uniform(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert balanced([1, 1, 1, 1, 4, 4], 3) == [range(0, 4), range(4, 5), range(5, 6)]
    specs = parse_partition("E,t,t|t,t,t|t,t,L", 7, 3)
    assert [s.blocks for s in specs] == [range(0, 2), range(2, 5), range(5, 7)]
    assert specs[0].embed and specs[-1].head and not specs[1].embed
    with pytest.raises(ValueError, match="places 4 blocks but the model has 7"):
        parse_partition("E,t,t|t,t,L", 7, 2)
    with pytest.raises(ValueError, match="exceed the 3 layers"):
        stage_specs(3, 2, 2)


@pytest.mark.unit
@pytest.mark.parametrize("p,m,v", [(2, 1, 1), (2, 4, 1), (4, 4, 1), (4, 8, 1), (3, 5, 1), (2, 4, 2), (4, 8, 2),
                                   (2, 6, 3), (4, 4, 4)])
def test_simulated_bubble_matches_theory(p, m, v):
    schedules = ["gpipe", "1f1b"] if v == 1 else ["interleaved"]
    for schedule in schedules:
        for backward_time in (1.0, 2.0):
            sim = simulate(schedule, p, m, v, forward_time=1.0, backward_time=backward_time)
            assert sim["bubble"] == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-9), (schedule, backward_time)
    assert "bubble" in render(simulate(schedules[0], p, m, v))


@pytest.mark.unit
@pytest.mark.parametrize("p,m", [(2, 2), (2, 4), (3, 5), (4, 4), (4, 8), (5, 10)])
def test_simulated_zb_h1_bubble_matches_its_formula(p, m):
    """Qi et al. 2023: ZB-H1 idles (p-1)(T_F + T_B - T_W) per rank where 1F1B idles (p-1)(T_F + T_B + T_W)
    (T_B: the input-gradient part of the backward), when T_W <= T_F and T_W <= T_B and m >= p."""
    for forward, input_grad, weight in [(1, 1, 1), (1, 1.5, 0.5), (2, 1, 1), (1, 2, 0.25)]:
        sim = simulate("zb-h1", p, m, 1, forward, input_grad + weight, weight)
        idle = (p - 1) * (forward + input_grad - weight)
        assert sim["bubble"] == pytest.approx(idle / (idle + m * (forward + input_grad + weight)), abs=1e-9)
        assert sim["bubble"] < simulate("1f1b", p, m, 1, forward, input_grad + weight, weight)["bubble"]
    assert "W" in render(simulate("zb-h1", p, m))


@pytest.mark.unit
def test_schedule_validation():
    with pytest.raises(ValueError, match="multiple of parallel.pipeline"):
        check_schedule("interleaved", 4, 6, 2)
    with pytest.raises(ValueError, match="needs parallel.schedule=interleaved"):
        check_schedule("1f1b", 2, 4, 2)
    with pytest.raises(ValueError, match="zb-h1 runs one chunk per rank"):
        check_schedule("zb-h1", 2, 4, 2)


GPT2 = dict(n_layer=8, n_head=2, n_embd=32, n_positions=16, vocab_size=97, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)


def _pipeline_grads(cases):
    """For each (schedule, m, v): run one pipelined forward/backward with plain autograd and compare the
    loss and every gradient of this rank's chunks with the dense model's."""
    import torch.distributed as dist

    from modeling.build import build_model
    from modeling.pipeline import defer_weight_grads, split_chunks
    from parallel.cross_entropy import causal_lm_loss
    from parallel.p2p import PipeComm
    from parallel.partition import chunks_of_rank
    from parallel.schedules import run_schedule
    from parallel.weight_grad import WeightGradStore
    from training.lifecycle import init_distributed

    init_distributed()
    rank, p = dist.get_rank(), dist.get_world_size()
    dense = build_model(pretrained=None, arch="gpt2", config=dict(GPT2), vocab_size=None, seed=11)
    results = []
    for schedule, m, v in cases:
        ids = torch.randint(0, 97, (m, 2, 16), generator=torch.Generator().manual_seed(m))
        ref = copy.deepcopy(dense)
        ref_loss = sum(ref(input_ids=ids[k], labels=ids[k]).loss for k in range(m)) / m
        ref_loss.backward()
        model = copy.deepcopy(dense)
        names = {id(prm): n for n, prm in model.named_parameters(remove_duplicate=False)}
        chunks = split_chunks(model, chunks_of_rank(stage_specs(8, p, v), p, rank), 16)
        losses = []

        def forward_step(chunk, k, x, chunks=chunks, ids=ids, m=m, losses=losses):
            out = chunks[chunk](ids[k] if chunks[chunk].spec.embed else x)
            if chunks[chunk].spec.head:
                loss = causal_lm_loss(out, ids[k]) / m
                losses.append(loss.detach())
                return loss
            return out

        store = WeightGradStore()
        if schedule == "zb-h1":
            defer_weight_grads(chunks, store)

        def backward_step(y, grad, chunk, k, store=store):
            with store.collecting((chunk, k)):
                torch.autograd.backward(y, grad)

        def weight_step(chunk, k, store=store):
            for weight, grad in store.weight_grads((chunk, k)):
                weight.grad = grad if weight.grad is None else weight.grad + grad

        comm = PipeComm(list(range(p)), rank, (2, 16, 32), torch.float32, torch.device("cpu"), timeout_s=60)
        stats = run_schedule(ORDERS[schedule](p, m, rank, v), p=p, v=v, rank=rank, comm=comm,
                             forward_step=forward_step, backward_step=backward_step, weight_step=weight_step)
        assert not store.pending(), f"{schedule}: W ops left {store.pending()}"
        if rank == p - 1:
            torch.testing.assert_close(sum(losses), ref_loss.detach(), rtol=1e-5, atol=1e-6)
        ref_grads = dict(ref.named_parameters(remove_duplicate=False))
        for prm in chunks.parameters():
            name = names[id(prm)]
            if prm is model.transformer.wte.weight and p > 1:
                continue  # tied: embedding and head gradients live on two stages, checked below
            torch.testing.assert_close(prm.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda msg, case=f"{schedule} m={m} v={v} {name}": f"{case}: {msg}")
        tied = model.transformer.wte.weight.grad
        tied_sum = tied.clone() if tied is not None and (rank in (0, p - 1)) else torch.zeros_like(dense.lm_head.weight)
        dist.all_reduce(tied_sum)  # embedding-side + head-side contributions = the dense tied gradient
        torch.testing.assert_close(tied_sum, ref_grads["transformer.wte.weight"].grad, rtol=1e-5, atol=1e-6)
        results.append((schedule, m, v, stats.max_in_flight))
    return results


# fp32: the same micro-batches through the same weights, only split over processes. The loss and
# gradients match to ~1e-7; 1e-5 would still catch a dropped micro-batch or a gradient sent to the
# wrong chunk (both off by >1e-2).
@pytest.mark.multiprocess
@pytest.mark.parametrize("p", [2, 4])
def test_schedules_match_single_process_gradients(p):
    cases = [(s, m, 1) for s in ("gpipe", "1f1b", "zb-h1") for m in (1, p, 2 * p)]
    cases += [("interleaved", m, 2) for m in (p, 2 * p)]  # needs m % p == 0 (validated), so no m = 1
    per_rank = run_ranks(_pipeline_grads, p, cases, timeout=400)
    stage0 = {(s, m, v): peak for s, m, v, peak in per_rank[0]}
    for (schedule, m, _v), peak in stage0.items():
        if schedule == "gpipe":
            assert peak == m  # GPipe holds every micro-batch's activations
        elif schedule in ("1f1b", "zb-h1"):
            assert peak == min(p, m)  # 1F1B (and ZB-H1, its order): never more than p on stage 0


def _fail_mid_schedule():
    import torch.distributed as dist

    from parallel.p2p import PipeComm, PipelineTimeout
    from parallel.schedules import one_f_one_b_order, run_schedule
    from training.lifecycle import init_distributed

    init_distributed()
    rank = dist.get_rank()
    comm = PipeComm([0, 1], rank, (2,), torch.float32, torch.device("cpu"), timeout_s=5)
    weight = torch.ones(2, requires_grad=True)

    def forward_step(chunk, k, x):
        if rank == 1 and k == 2:
            raise RuntimeError("injected failure on rank 1")
        return (weight * k) if x is None else (x * weight).sum()

    try:
        run_schedule(one_f_one_b_order(2, 4, rank), p=2, v=1, rank=rank, comm=comm, forward_step=forward_step,
                     backward_step=lambda y, g, *_: torch.autograd.backward(y, g))
    except PipelineTimeout as exc:
        return f"timeout: {exc}"
    except RuntimeError as exc:
        return f"error: {exc}"
    return "finished"


@pytest.mark.multiprocess
def test_failed_rank_is_an_error_not_a_hang():
    """Rank 1 fails in its third forward; rank 0, waiting for a gradient, gets a timeout error instead of
    blocking forever (under torchrun either error ends the job)."""
    rank0, rank1 = run_ranks(_fail_mid_schedule, 2, timeout=120)
    assert rank1 == "error: injected failure on rank 1"
    assert rank0.startswith("timeout: pipeline rank 0: no gradient from global rank 1 within 5s")


@pytest.mark.unit
def test_impossible_pipeline_layouts_are_rejected():
    from transformers import GPT2Config

    from modeling.pipeline import check_pipeline_fits

    config = GPT2Config(n_layer=4)
    with pytest.raises(ValueError, match="exceed the 4 layers"):
        check_pipeline_fits(config, 8, 1, "uniform")
    with pytest.raises(ValueError, match="virtual_stages=3 x parallel.pipeline=2 = 6 chunks do not divide"):
        check_pipeline_fits(config, 2, 3, "uniform")
    with pytest.raises(ValueError, match="E \\(embedding\\) must open the first stage"):
        check_pipeline_fits(config, 2, 1, "t,E,t|t,t,L")
    check_pipeline_fits(config, 2, 1, "E,t|t,t,t,L")


def _steady_state_exchange():
    """The 1F1B steady state between two stages: rank 0 sends micro-batch 1's activation while it receives
    micro-batch 0's gradient; rank 1 at the same time sends that gradient and receives the activation. Each
    side posts its send and its receive in one batch_isend_irecv (what NCCL needs to not deadlock)."""
    import torch.distributed as dist

    from parallel.p2p import PipeComm
    from training.lifecycle import init_distributed

    init_distributed()
    batches = []
    original = dist.batch_isend_irecv

    def recording(ops):
        batches.append(sorted(op.op.__name__ for op in ops))
        return original(ops)

    dist.batch_isend_irecv = recording
    rank = dist.get_rank()
    comm = PipeComm([0, 1], rank, (3,), torch.float32, torch.device("cpu"), timeout_s=30)
    if rank == 0:
        comm.exchange(send=torch.full((3,), 1.0), send_to=1)  # warm-up: forward of micro-batch 0
        comm.exchange(send=torch.full((3,), 2.0), send_to=1, recv_from=1)  # forward of 1, gradient of 0 back
        out = comm.receive().tolist()
    else:
        comm.exchange(recv_from=-1)
        first = comm.receive()
        comm.exchange(send=first * 10, send_to=-1, recv_from=-1)  # backward of 0, forward input of 1
        out = [first.tolist(), comm.receive().tolist()]
    comm.flush()
    dist.batch_isend_irecv = original
    return out, batches


@pytest.mark.multiprocess
def test_adjacent_stages_exchange_in_the_steady_state_with_batched_operations():
    (rank0, batches0), (rank1, batches1) = run_ranks(_steady_state_exchange, 2, timeout=120)
    assert rank0 == [10.0] * 3 and rank1 == [[1.0] * 3, [2.0] * 3]
    assert ["irecv", "isend"] in batches0 and ["irecv", "isend"] in batches1


@pytest.mark.unit
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved", "zb-h1"])
def test_every_schedule_posts_messages_in_the_same_order_on_both_sides(schedule):
    """Untagged p2p (NCCL has no tags) matches a pair's sends and receives in posting order: for every pair of
    stages, the sender's messages and the receiver's receives come in the same order (interleaved at p=2 mixes
    activations and gradients in both directions between the same two ranks)."""
    from parallel.schedules import message_order

    for p in (2, 3, 4):
        for m in (1, 2, 3, 4, 8, 12):
            for v in ((2, 3) if schedule == "interleaved" else (1,)):
                if schedule == "interleaved" and m % p:
                    continue
                pairs = message_order([ORDERS[schedule](p, m, r, v) for r in range(p)], p, v)
                assert pairs, (p, m, v)
                for pair, (sent, received) in pairs.items():
                    assert sent == received, f"{schedule} p={p} m={m} v={v} {pair}"
    swapped = [ORDERS["1f1b"](2, 4, r) for r in range(2)]
    swapped[1][0], swapped[1][2] = swapped[1][2], swapped[1][0]  # rank 1 takes micro-batch 1 before 0
    assert any(sent != received for sent, received in message_order(swapped, 2, 1).values())
