"""Each tensor-parallel layer and the vocabulary-parallel cross entropy against its dense torch
counterpart built from the same full tensors, at tensor sizes 2 and 4: outputs and input / weight /
bias gradients. fp32; the only differences are summation order in the all-reduces, so 1e-5 (relative to
values of order 1) is ~100x the observed error and far below any slicing mistake (order 1). The shard rule
for fused column layers of unequal blocks (Phi-3's q|k|v under grouped-query attention) in one process.
The module mixes tiers: each test carries its own."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_ranks

TOL = dict(rtol=1e-5, atol=1e-5)


def _init():
    import torch.distributed as dist

    from training.lifecycle import init_distributed

    init_distributed()
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size()


def _close(a, b, what):
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def _layers_match_dense(perturb: bool = False):
    from parallel.comm import scatter_to_sequence_parallel_region, scatter_to_tensor_parallel_region
    from parallel.cross_entropy import vocab_parallel_cross_entropy
    from parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead

    group, rank, world = _init()
    gen = torch.Generator().manual_seed(0)
    x_full = torch.randn(3, 8, 16, generator=gen)
    # --- column parallel (gather_output) -------------------------------------------------------
    dense = torch.nn.Linear(16, 24)
    dense.weight.data = torch.randn(24, 16, generator=gen)
    dense.bias.data = torch.randn(24, generator=gen)
    upstream = torch.randn(3, 8, 24, generator=gen)
    col = ColumnParallelLinear.from_dense(dense.weight.data, dense.bias.data, group=group, gather_output=True)
    if perturb and rank == world - 1:
        col.weight.data[0, 0] += 1e-2
    xd, xt = x_full.clone().requires_grad_(), x_full.clone().requires_grad_()
    (dense(xd) * upstream).sum().backward()
    yt = col(xt)
    (yt * upstream).sum().backward()
    _close(yt, dense(x_full), "column output")
    _close(xt.grad, xd.grad, "column dX")
    _close(col.weight.grad, dense.weight.grad.chunk(world)[rank], "column dW")
    _close(col.bias.grad, dense.bias.grad.chunk(world)[rank], "column db")
    # --- row parallel (input split by columns) ---------------------------------------------------
    dense = torch.nn.Linear(24, 16)
    dense.weight.data = torch.randn(16, 24, generator=gen)
    dense.bias.data = torch.randn(16, generator=gen)
    x24 = torch.randn(3, 8, 24, generator=gen)
    up16 = torch.randn(3, 8, 16, generator=gen)
    row = RowParallelLinear.from_dense(dense.weight.data, dense.bias.data, group=group)
    xd, xt = x24.clone().requires_grad_(), x24.clone().requires_grad_()
    (dense(xd) * up16).sum().backward()
    yt = row(scatter_to_tensor_parallel_region(xt, group))
    (yt * up16).sum().backward()
    _close(yt, dense(x24), "row output")
    _close(xt.grad, xd.grad, "row dX")
    _close(row.weight.grad, dense.weight.grad.chunk(world, dim=1)[rank], "row dW")
    _close(row.bias.grad, dense.bias.grad, "row db")
    # --- sequence parallel: column with all-gather entry, row with reduce-scatter exit -------------
    col_sp = ColumnParallelLinear.from_dense(dense.weight.data.t().contiguous(), None, group=group,
                                             sequence_parallel=True)
    row_sp = RowParallelLinear.from_dense(dense.weight.data, dense.bias.data, group=group, sequence_parallel=True)
    xd, xt = x_full.clone().requires_grad_(), x_full.clone().requires_grad_()
    ref = torch.nn.functional.linear(torch.nn.functional.linear(xd, dense.weight.t()), dense.weight, dense.bias)
    (ref * torch.ones_like(ref)).sum().backward()
    y_shard = row_sp(col_sp(scatter_to_sequence_parallel_region(xt, group)))
    assert y_shard.shape[1] == 8 // world
    y_shard.sum().backward()
    _close(y_shard, ref.detach().chunk(world, dim=1)[rank], "sequence-parallel output shard")
    _close(xt.grad, xd.grad, "sequence-parallel dX")
    # --- vocabulary-parallel embedding (vocab 11: padded for 2 and 4 ranks) ------------------------
    table = torch.randn(11, 16, generator=gen)
    ids = torch.randint(0, 11, (3, 8), generator=gen)
    emb_up = torch.randn(3, 8, 16, generator=gen)
    dense_emb = torch.nn.Embedding.from_pretrained(table.clone(), freeze=False)
    (dense_emb(ids) * emb_up).sum().backward()
    emb = VocabParallelEmbedding.from_dense(table, group=group)
    out = emb(ids)
    (out * emb_up).sum().backward()
    _close(out, table[ids], "embedding output")
    full_grad = torch.cat([dense_emb.weight.grad, torch.zeros(emb.padded_num_embeddings - 11, 16)])
    _close(emb.weight.grad, full_grad.chunk(world)[rank], "embedding dW")
    # --- vocabulary-parallel head + cross entropy (never gathers the vocabulary) --------------------
    head_w = torch.randn(11, 16, generator=gen)
    targets = torch.randint(0, 11, (3, 8), generator=gen)
    hd, ht = x_full.clone().requires_grad_(), x_full.clone().requires_grad_()
    ref_loss = torch.nn.functional.cross_entropy((hd @ head_w.t()).transpose(1, 2), targets, reduction="none")
    ref_loss.mean().backward()
    head = VocabParallelHead.from_dense(head_w, None, group=group)
    local_logits = head(ht)
    assert local_logits.shape[-1] == head.out_features // world
    loss = vocab_parallel_cross_entropy(local_logits, targets, group, head.vocab_start, head.valid_rows)
    loss.mean().backward()
    _close(loss, ref_loss.detach(), "cross entropy per token")
    _close(ht.grad, hd.grad, "cross entropy dX")
    return True


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [2, 4])
def test_layers_and_cross_entropy_match_dense(world):
    assert all(run_ranks(_layers_match_dense, world, timeout=300))


@pytest.mark.multiprocess
def test_layer_test_can_fail():
    """A 1e-2 perturbation of one weight on one rank must fail the comparison."""
    with pytest.raises(RuntimeError, match="column output"):
        run_ranks(_layers_match_dense, 2, True, timeout=300)


def _region_overlaps_weight_grads(sequence_parallel):
    """Two column layers (q and k) entering one region with async_grad_reduce: the entry's backward launches
    one collective, computes both weight gradients, then waits; the results equal the dense layers', and the
    gradient hooks DeepSpeed relies on fire once per weight. What the forward keeps for the backward is the
    entry's input: with sequence parallelism this rank's part of the sequence, not the gathered whole."""
    import parallel.region as region
    from parallel.comm import scatter_to_sequence_parallel_region
    from parallel.layers import ColumnParallelLinear

    group, rank, world = _init()
    gen = torch.Generator().manual_seed(0)
    x_full = torch.randn(2, 4, 8, generator=gen)
    dense = [torch.nn.Linear(8, 6) for _ in range(2)]
    for d in dense:
        d.weight.data, d.bias.data = torch.randn(6, 8, generator=gen), torch.randn(6, generator=gen)
    upstream = [torch.randn(2, 4, 6, generator=gen) for _ in dense]
    layers = [ColumnParallelLinear.from_dense(d.weight.data, d.bias.data, group=group, enter_region=False)
              for d in dense]
    entry = region.RegionEntry(group, layers, sequence_parallel, overlap=True)
    events = []
    for name, layer in zip("qk", layers):
        layer.weight.register_post_accumulate_grad_hook(lambda p, n=name: events.append(f"hook {n}"))
    launch_name = "start_reduce_scatter" if sequence_parallel else "start_all_reduce"
    launch, weight_grad = getattr(region, launch_name), region._PendingWeightGrads.weight_grad

    class LoggedWork:
        def __init__(self, work):
            self.work = work

        def wait(self):
            events.append("wait")
            return self.work.wait()

    def logged_launch(*args):
        events.append("launch")
        out, work = launch(*args)
        return out, LoggedWork(work)

    def logged_weight_grad(self, weight, entered):
        grad = weight_grad(self, weight, entered)
        if grad is not None:
            events.append("dW")
        return grad

    setattr(region, launch_name, logged_launch)
    region._PendingWeightGrads.weight_grad = logged_weight_grad
    weights = {p.untyped_storage().data_ptr() for layer in layers for p in layer.parameters()}
    saved = {}  # storage -> bytes of the activations the entry and the layers keep for the backward

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    try:
        xt = x_full.clone().requires_grad_()
        local = scatter_to_sequence_parallel_region(xt, group) if sequence_parallel else xt
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            entered = entry(local)
            outputs = [layer(entered) for layer in layers]
        # this rank's part of the sequence only (Megatron's): the backward gathers it again
        assert sum(saved.values()) == local.nbytes, (saved, local.nbytes)
        sum((out * up.chunk(world, dim=-1)[rank]).sum() for out, up in zip(outputs, upstream)).backward()
    finally:
        setattr(region, launch_name, launch)
        region._PendingWeightGrads.weight_grad = weight_grad
    assert events[:4] == ["launch", "dW", "dW", "wait"] and sorted(events[4:]) == ["hook k", "hook q"], events
    xd = x_full.clone().requires_grad_()
    sum((d(xd) * up).sum() for d, up in zip(dense, upstream)).backward()
    _close(xt.grad, xd.grad, "region dX")
    for name, layer, d in zip("qk", layers, dense):
        _close(layer.weight.grad, d.weight.grad.chunk(world)[rank], f"{name} dW")
        _close(layer.bias.grad, d.bias.grad.chunk(world)[rank], f"{name} db")
    return True


@pytest.mark.multiprocess
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_region_launches_its_collective_before_the_weight_gradients(sequence_parallel):
    assert all(run_ranks(_region_overlaps_weight_grads, 2, sequence_parallel, timeout=300))


# --- fused column layers of unequal blocks (q|k|v under grouped-query attention) ----------------------------
QKV = (8, 4, 4)  # q: 4 heads x 2, k and v: 2 kv heads x 2


def _regroup(local_outputs: list[torch.Tensor], sizes: tuple[int, ...]) -> torch.Tensor:
    """The full output from every rank's (rank order), each rank's output its part of each block in block order."""
    world = len(local_outputs)
    parts = [y.split([size // world for size in sizes], dim=-1) for y in local_outputs]
    return torch.cat([torch.cat([p[block] for p in parts], dim=-1) for block in range(len(sizes))], dim=-1)


@pytest.mark.unit
def test_shard_ranges_of_given_block_sizes():
    from parallel.layers import shard_ranges

    assert shard_ranges(16, 0, 2, QKV) == ([(0, 4), (8, 10), (12, 14)], 8)
    assert shard_ranges(16, 1, 2, QKV) == ([(4, 8), (10, 12), (14, 16)], 8)
    assert shard_ranges(16, 3, 4, QKV) == ([(6, 8), (11, 12), (15, 16)], 4)
    for rank in range(2):  # equal sizes given as a tuple: today's n equal blocks
        assert shard_ranges(12, rank, 2, (4, 4, 4), 12) == shard_ranges(12, rank, 2, 3, 12)
    # padding stays with equal blocks: a vocabulary of 11 padded to 12 at world 4 (the last rank holds 2 rows)
    assert shard_ranges(11, 3, 4, 1, 12) == ([(9, 11)], 3)


@pytest.mark.unit
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_take_shard_of_block_sizes_merges_back(world, dim):
    from modeling.shards import _merge
    from parallel.layers import mark_sharded, take_shard

    full = torch.arange(48, dtype=torch.float32).view(16, 3)
    full = full if dim == 0 else full.t().contiguous()
    shards = [take_shard(full, dim, rank, world, QKV) for rank in range(world)]
    assert all(shard.shape[dim] == 16 // world for shard in shards)
    marked = torch.nn.Parameter(shards[0].clone())
    mark_sharded(marked, dim, 16, list(QKV))  # type: ignore[arg-type]  # a list from a plan is kept as a tuple
    assert marked.tp_fused_chunks == QKV
    assert torch.equal(_merge(shards, marked), full)
    assert torch.equal(_regroup([s.t() if dim == 0 else s for s in shards], QKV),
                       full.t() if dim == 0 else full)  # each rank holds its part of q, then k, then v


@pytest.mark.unit
def test_column_layer_of_block_sizes_on_one_rank_is_the_dense_layer():
    from parallel.layers import ColumnParallelLinear

    gen = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(6, 16)
    col = ColumnParallelLinear.from_dense(dense.weight.data, dense.bias.data, group=None, fused_chunks=QKV)
    assert col.weight.tp_fused_chunks == QKV and col.bias.tp_fused_chunks == QKV
    x = torch.randn(2, 5, 6, generator=gen)
    torch.testing.assert_close(col(x), dense(x), rtol=0, atol=0)


@pytest.mark.unit
def test_block_sizes_that_do_not_fit_are_refused_by_size():
    from parallel.layers import ColumnParallelLinear, shard_ranges, take_shard

    with pytest.raises(ValueError, match=r"\(8, 3, 5\) are not each a positive multiple of the tensor size 2"):
        shard_ranges(16, 0, 2, (8, 3, 5))
    with pytest.raises(ValueError, match=r"\(8, 6, 6\) are not each a positive multiple of the tensor size 4"):
        take_shard(torch.zeros(20, 3), 0, 1, 4, (8, 6, 6))
    with pytest.raises(ValueError, match=r"\(8, 4, 2\) sum to 14, not to the dimension's 16"):
        ColumnParallelLinear(6, 16, group=None, fused_chunks=(8, 4, 2))
    with pytest.raises(ValueError, match=r"\(8, 4, 4\) of a dimension of 16 padded to 20"):
        shard_ranges(16, 0, 4, QKV, 20)
    with pytest.raises(ValueError, match="a dimension of 16 is not divisible by 3 blocks x tensor size 2"):
        shard_ranges(16, 0, 2, 3)


def _column_of_block_sizes_matches_dense():
    import torch.distributed as dist

    from modeling.shards import full_tensor, shard_for
    from parallel.layers import ColumnParallelLinear, take_shard

    group, rank, world = _init()
    gen = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(6, 16)
    dense.weight.data, dense.bias.data = torch.randn(16, 6, generator=gen), torch.randn(16, generator=gen)
    x_full, upstream = torch.randn(2, 5, 6, generator=gen), torch.randn(2, 5, 16, generator=gen)
    col = ColumnParallelLinear.from_dense(dense.weight.data, dense.bias.data, group=group, fused_chunks=QKV)
    xd, xt = x_full.clone().requires_grad_(), x_full.clone().requires_grad_()
    (dense(xd) * upstream).sum().backward()
    y = col(xt)
    gathered = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(gathered, y.detach().contiguous(), group=group)
    _close(_regroup(gathered, QKV), dense(x_full), "fused q|k|v output, regrouped per block")
    (y * take_shard(upstream, 2, rank, world, QKV)).sum().backward()
    _close(xt.grad, xd.grad, "fused q|k|v dX")
    _close(col.weight.grad, take_shard(dense.weight.grad, 0, rank, world, QKV), "fused q|k|v dW")
    _close(col.bias.grad, take_shard(dense.bias.grad, 0, rank, world, QKV), "fused q|k|v db")
    # the shard contract (checkpoints, export) places and merges it by the same rule
    assert torch.equal(shard_for(col.weight, False, group).cut(dense.weight.data), col.weight.data)
    assert torch.equal(full_tensor(col, "weight", col.weight.detach(), group), dense.weight.data)
    assert torch.equal(full_tensor(col, "bias", col.bias.detach(), group), dense.bias.data)
    return True


@pytest.mark.multiprocess
def test_column_layer_of_block_sizes_matches_dense_at_tp2():
    assert all(run_ranks(_column_of_block_sizes_matches_dense, 2, timeout=300))
