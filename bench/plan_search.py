"""``bench plan --device-memory M --world-size N``: every layout of N ranks the run's own checks accept, planned
(``bench.plan_stages``), those whose largest rank fits M ranked by a step-time estimate (``step_seconds``)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from bench.cli import fail
from bench.formulas import context_attention_bytes, decoder_shape, flops_per_token
from bench.plan_stages import StagePlan, layout_shapes, plan_row, stage_memory
from bench.plan_trace import full_meta_model


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidates(args, world: int, global_batch: int):
    """(label, config, data degree) of every layout of ``world`` ranks the run's own checks accept, with the
    global batch of ``global_batch`` sequences split into micro-batches of the config's size."""
    from modeling.experts import check_expert_parallel_fits, experts_modules
    from modeling.pipeline import check_pipeline_fits
    from modeling.tp_plans import check_tensor_parallel_fits
    from training.config import load

    base = load(args.config, args.set)
    micro = base.train.micro_batch_size
    modes = ("none", "selective", "full") if args.recompute == "all" else (base.parallel.activation_checkpointing,)
    full = full_meta_model(base)
    hf, moe = full.config, bool(experts_modules(full))
    pairs = [(tensor, pipeline) for tensor in _divisors(world) if tensor <= args.max_tensor
             for pipeline in _divisors(world // tensor)]
    for t, p in pairs:
        data = world // (t * p)
        if data % base.parallel.context or global_batch % (micro * data // base.parallel.context):
            continue
        for zero, mode, expert in itertools.product((0, 1, 2, 3), modes, _divisors(data) if moe else [1]):
            sets = [f"parallel.tensor={t}", f"parallel.pipeline={p}", f"parallel.zero_stage={zero}",
                    f"parallel.activation_checkpointing={mode}",
                    f"train.grad_accum={global_batch * base.parallel.context // (micro * data)}",
                    f"parallel.expert={expert}"]
            try:
                check_tensor_parallel_fits(hf, t)
                check_pipeline_fits(hf, p, base.parallel.virtual_stages, base.parallel.partition)
                check_expert_parallel_fits(full, expert)
                cfg = load(args.config, args.set + sets)
            except ValueError:
                continue
            context = base.parallel.context
            label = f"tensor={t},pipeline={p},data={data // context}" + (f",context={context}" if context > 1 else "")
            yield label + (f",expert={expert}" if expert > 1 else ""), cfg, data


def step_seconds(cfg, full, data: int, stages: list[StagePlan], fits: dict, device_flops: float) -> dict:
    """A step-time estimate: the step's FLOPs (``flops_per_token``, recomputation included; of a
    mixture-of-experts model its active parameters: the dense ones and top-k of every layer's experts) at
    ``device_flops`` per rank, stretched by the pipeline bubble (p - 1) / (v m), plus the communication the
    fits predict, not overlapped: per micro-batch and block 4 tensor-parallel all-reduces of the hidden states
    (forward 2, backward 2), per step the data-parallel reduction of the gradients (ZeRO-3: the parameters
    gathered in the forward and the backward too, per micro-batch), per micro-batch and chunk boundary a send
    of the hidden states each way, and with expert parallelism per micro-batch and MoE layer 4 all-to-alls of
    the token-expert pairs (dispatch and combine, forward and backward; the all-gather fit of the same bytes)."""
    from bench.comm import predict_seconds
    from modeling.experts import active_parameters, experts_modules

    par, m, hf = cfg.parallel, cfg.train.grad_accum, full.config
    replicas = data // par.context  # context ranks share their samples: the tokens of a step are the replicas'
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    width = 2 if cfg.precision != "fp32" else 4
    experts = experts_modules(full)
    params = active_parameters(full) if experts else sum(s.params for s in stages) * par.tensor
    shape = decoder_shape(hf)
    per_token = flops_per_token(par.activation_checkpointing, params, shape.layers, shape.hidden, cfg.data.seq_len,
                                shape.attention_width)
    compute = per_token * tokens * m * replicas / (par.tensor * par.pipeline * data * device_flops)
    bubble = (par.pipeline - 1) / (par.virtual_stages * m)
    hidden_bytes = tokens // par.context * width * shape.hidden  # a rank's part of the sequence
    layers = shape.layers / par.pipeline
    tp = 4 * layers * m * predict_seconds(fits["all_reduce"], hidden_bytes) if par.tensor > 1 else 0.0
    grads = width * max(s.params for s in stages)
    dp = 0.0
    if data > 1:
        dp = predict_seconds(fits["all_reduce"], grads)
        if par.zero_stage == 3:
            dp += 2 * m * predict_seconds(fits["all_gather"], grads)
    pp = 2 * m * par.virtual_stages * predict_seconds(fits["send_recv"], hidden_bytes) if par.pipeline > 1 else 0.0
    ep = 0.0
    if par.expert > 1:
        pair_bytes = hidden_bytes * getattr(hf, "num_experts_per_tok", 1)
        ep = 4 * len(experts) / par.pipeline * m * predict_seconds(fits["all_gather"], pair_bytes)
    cp = context_seconds(cfg, shape, fits) * layers * m
    total = compute * (1 + bubble) + tp + dp + pp + ep + cp
    return {"step_s": total, "compute_s": compute, "bubble": bubble, "tp_s": tp, "dp_s": dp, "pp_s": pp,
            "ep_s": ep, "cp_s": cp, "tokens_per_s": tokens * m * replicas / total}


def context_seconds(cfg, shape, fits: dict) -> float:
    """Seconds of one layer's context-parallel attention traffic per micro-batch, forward and backward
    (``bench.formulas.context_attention_bytes`` of the method the run picks, ``modeling.context.choose_method``):
    Ulysses 8 all-to-alls (priced by the all-gather fit of the same bytes, as the expert exchange), ring its
    block sends (the send fit: 2 (N-1) block sends and N accumulator sends)."""
    from bench.comm import predict_seconds
    from modeling.context import choose_method

    par = cfg.parallel
    if par.context == 1:
        return 0.0
    heads, kv = shape.heads // par.tensor, max(1, shape.kv_heads // par.tensor)
    method = choose_method(par.context_attention, heads, kv, par.context)
    width = 2 if cfg.precision != "fp32" else 4
    sent = context_attention_bytes(method, cfg.train.micro_batch_size, cfg.data.seq_len, heads, kv, shape.head_dim,
                                   par.context, width)
    if method == "ulysses":  # per all-to-all: its input, of which (N-1)/N leaves the rank
        per_call = (sent["forward"] + sent["backward"]) / 8 * par.context / (par.context - 1)
        return 8 * predict_seconds(fits["all_gather"], per_call)
    sends = 3 * par.context - 2
    return sends * predict_seconds(fits["send_recv"], (sent["forward"] + sent["backward"]) / sends)


def search(args) -> list[dict]:
    """Every candidate layout planned; those whose largest rank fits ``args.device_memory``, fastest first."""
    fits = json.loads(Path(args.comm_fit).read_text())["fit"]
    rows, shapes, full = [], {}, None
    for label, cfg, data in candidates(args, args.world_size, args.global_batch or 0):
        full = full if full is not None else full_meta_model(cfg)
        par = cfg.parallel
        key = (par.tensor, par.pipeline, par.activation_checkpointing, par.expert, par.context)
        if key not in shapes:  # the traces do not depend on ZeRO or the data-parallel degree
            shapes[key] = layout_shapes(cfg, full, args.device)
        stages = [stage_memory(s, cfg, data, par.zero_stage, cfg.train.grad_accum) for s in shapes[key]]
        row = {**plan_row(label, cfg, data, stages), "micro_batches": cfg.train.grad_accum,
               **step_seconds(cfg, full, data, stages, fits, args.device_tflops * 1e12)}
        row["fits"] = row["peak_bytes"] <= args.device_memory
        rows.append(row)
    return sorted(rows, key=lambda r: (not r["fits"], -r["tokens_per_s"], r["peak_bytes"]))


def search_table(rows: list[dict], top: int) -> str:
    # expert- and context-parallel columns for the runs that have them only
    extra = [(key, name) for key, name in (("ep_s", "EP"), ("cp_s", "CP")) if any(r.get(key) for r in rows)]
    lines = ["| layout | ZeRO | recompute | micro-batches | planned peak GiB | fits | est. tokens/s | compute s | "
             "bubble | TP comm s | DP comm s | PP comm s |" + "".join(f" {name} comm s |" for _, name in extra),
             "|" + "---|" * (12 + len(extra))]
    for r in rows[:top]:
        lines.append(f"| {r['layout']} | {r['zero']} | {r['recompute']} | {r['micro_batches']} | "
                     f"{r['peak_bytes'] / 2**30:.1f} | {'yes' if r['fits'] else 'no'} | {r['tokens_per_s']:,.0f} | "
                     f"{r['compute_s']:.3f} | {r['bubble']:.0%} | {r['tp_s']:.3f} | {r['dp_s']:.3f} | "
                     f"{r['pp_s']:.3f} |" + "".join(f" {r[key]:.3f} |" for key, _ in extra))
    return "\n".join(lines) + "\n"


def check_search_args(args) -> None:
    """The search's numbers, each at least 1 (a device's memory: more than nothing), before anything is built."""
    for flag in ("world_size", "global_batch", "max_tensor", "top"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            fail("bench plan", f"--{flag.replace('_', '-')} {value}: must be at least 1")
    for flag in ("device_memory", "device_tflops"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            fail("bench plan", f"--{flag.replace('_', '-')} {value}: must be positive")


def search_text(args) -> tuple[list[dict], str]:
    from training.config import load

    base = load(args.config, args.set)
    args.global_batch = args.global_batch or base.train.micro_batch_size * base.train.grad_accum * args.world_size
    rows = search(args)
    if not rows:
        fail("bench plan", f"--global-batch {args.global_batch}: no layout of --world-size {args.world_size} ranks "
                           f"splits it into micro-batches of train.micro_batch_size={base.train.micro_batch_size} "
                           f"per data-parallel rank; choose a global batch that micro_batch_size x the data-parallel "
                           f"degrees divide")
    fitting = sum(r["fits"] for r in rows)
    return rows, (f"{fitting} of {len(rows)} layouts of {args.world_size} ranks fit {args.device_memory / 2**30:.1f} "
                  f"GiB per device (global batch {args.global_batch} sequences; communication priced by "
                  f"{args.comm_fit}, compute at {args.device_tflops:g} TFLOP/s):\n\n" + search_table(rows, args.top))

