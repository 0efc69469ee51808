"""Memory per rank before any run, and the layouts that fit a machine.

    python -m bench plan --config configs/memory_gpt2.yaml --layout tensor=2,pipeline=2 --layout data=2,zero=2
    python -m bench plan --config configs/plan_llama7b.yaml --device cuda --device-memory 40GiB --world-size 8
    python -m bench plan --check bench/results/plan-grid-cpu/results.json

For each layout and each pipeline stage (the tensor-parallel ranks of a stage hold the same amounts):

- **model state**: this rank's parameters, counted on the real model (built on the meta device and cut by the
  run's own tensor-parallel plan and pipeline split, under a fake process group of the layout's size: no
  weights, no other process), times the bytes of weights, gradients, AdamW moments and DeepSpeed's fp32 master
  partition under the ZeRO stage and precision (``model_state_bytes``);
- **activations**: one micro-batch of each of this rank's chunks runs forward and backward on the meta device
  under the same fake group (TorchTitan's former estimator did the same with fake tensors): ``LiveBytes`` counts
  every tensor the operations make until it is freed. That gives what autograd keeps per micro-batch (with the
  run's recomputation mode, sequence parallelism, vocabulary-parallel loss) and the peak the forward and the
  backward add on top of it. The schedule's own operation list (``parallel.schedules.ORDERS``) says how many
  micro-batches of each chunk are in flight when;
- **transients of the step**: under ZeRO 1-2, the fp32 gradient partition DeepSpeed flattens for its optimizer
  (4 bytes per parameter / data-parallel degree); with pipelines and tied embeddings, the first and last
  stages' embedding-gradient buffers (``training.pipeline``: one kept over the step, two more at the sync).

The planned peak is the largest of the steps (model state + activations in flight + the running operation's
transient) and the optimizer step (model state + its transient); ``bench memory`` measures the same quantity
above the process's fixed runtime (interpreter, torch, DeepSpeed), which the plan leaves out.

With ``--device-memory`` and ``--world-size``, every layout of that many ranks (tensor x pipeline x data, ZeRO
0-3, the config's recomputation mode unless ``--recompute all``) is planned; those whose largest rank fits are
ranked by a step-time estimate: the step's FLOPs with recomputation (``flops_per_token``) at
``--device-tflops``, stretched by the pipeline bubble, plus the communication a ``bench comm`` fit (``--comm-fit``) predicts for the tensor-parallel
all-reduces, the data-parallel gradient reduction and the pipeline sends.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.cli import fail

MIB = 2**20


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive: every storage an operation returns counts once, from its creation until
    it is freed (a finalizer on the storage). Works on the meta device, where nothing is allocated."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._keys: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):  # a view or an in-place result shares an input's storage: not new
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in inputs:
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage) -> None:
        key = storage._cdata
        if key in self._keys:
            return
        self._keys.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._keys.discard(key)
        self.live -= size

    def reset_peak(self) -> int:
        self.peak = self.live
        return self.live


def _probe(tensor, device: str):
    """A tensor of ``tensor``'s rank and dtype on ``device`` with sequence dimensions of 2: enough for torch to
    choose its attention kernel as it would for the real one."""
    shape = tuple(tensor.shape[:-2]) + (2, 2 if tensor.dtype == torch.bool else tensor.shape[-1])
    return torch.zeros(shape, dtype=tensor.dtype, device=device)


def attention_as_on(device: str):
    """``F.scaled_dot_product_attention`` for meta tensors that runs the kernel ``device`` would run, whose
    saved tensors differ: the fused kernels keep the output and the log-sum-exp, the math path the s x s
    probabilities (meta tensors alone always take the math path). CPU: torch's own choice
    (``torch._fused_sdp_choice`` on small CPU tensors of the same kind). CUDA: the memory-efficient kernel,
    which keeps what flash attention keeps."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        args = (attn_mask, dropout_p, is_causal)
        if query.device.type != "meta":
            return original(query, key, value, *args, scale=scale, enable_gqa=enable_gqa)
        if device == "cuda":
            if enable_gqa and key.shape[-3] != query.shape[-3]:  # grouped-query attention: heads share keys
                repeats = query.shape[-3] // key.shape[-3]
                key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale)[0]
        probes = [_probe(t, "cpu") for t in (query, key, value)]
        mask = None if attn_mask is None else _probe(attn_mask, "cpu")
        choice = torch._fused_sdp_choice(*probes, mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if choice == SDPBackend.FLASH_ATTENTION.value:  # takes fewer key/value heads as they are
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        return original(query, key, value, *args, scale=scale, enable_gqa=enable_gqa)

    return attention


@dataclass
class ChunkTrace:
    """One micro-batch through one model chunk: bytes kept from its forward to its backward (with its output),
    and the most the forward and the backward add above what was alive when they began."""

    kept: int
    forward_peak: int
    backward_peak: int  # gradients already allocated, accumulated in place
    fresh_backward_peak: int = 0  # gradients made by this backward, kept to its end


@dataclass
class StagePlan:
    stage: int
    params: int
    model_state: dict[str, float]
    activations: float  # the most bytes of micro-batches in flight at once
    steps: float  # planned peak during forward and backward passes
    optimizer: float  # planned peak inside the optimizer step
    traces: list[ChunkTrace] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.steps, self.optimizer)


def _batch(cfg, device="meta") -> dict:
    """One micro-batch of token ids (their values do not matter to memory)."""
    b, s = cfg.train.micro_batch_size, cfg.data.seq_len
    ids = torch.zeros(b, s, dtype=torch.long, device=device)
    if cfg.data.source_field:
        target = torch.zeros(b, cfg.data.max_target_len, dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": target}
    return {"input_ids": ids, "labels": ids}


class _Bare:
    """What ``training.seq2seq.step_loss`` calls a model engine: the module itself."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _forward(module, cfg, groups, spec):
    """(output, loss or None) of one micro-batch as the training step computes it."""
    from modeling.parallelize import lm_loss, vocab_slice
    from parallel.cross_entropy import causal_lm_loss
    from training import seq2seq

    batch = _batch(cfg)
    if spec is None:  # the whole model, no pipeline
        if cfg.data.source_field:
            return None, seq2seq.step_loss(_Bare(module), batch, groups)
        logits = module(input_ids=batch["input_ids"]).logits
        return logits, lm_loss(module, logits, batch["labels"], groups.tp_group)
    hidden = (batch["input_ids"] if spec.embed else
              torch.zeros(cfg.train.micro_batch_size, cfg.data.seq_len, module.config.hidden_size, device="meta"))
    out = module(hidden)
    if not spec.head:
        return out, None
    start, valid = vocab_slice(module.head)
    return out, causal_lm_loss(out, batch["labels"], groups.tp_group, start, valid)


def _traced_pass(module, cfg, groups, spec, device: str) -> tuple[int, int, int]:
    """(bytes kept from the forward, the forward's peak, the backward's peak) of one micro-batch, each above
    what was alive when it began."""
    from unittest import mock

    from transformers import PreTrainedModel, masking_utils

    live = LiveBytes()
    causal_skip = masking_utils._ignore_causal_mask_sdpa
    # transformers looks at values that meta tensors do not have: the position ids, for packed sequences (the
    # training blocks' positions are 0..seq_len-1, never packed), and the padding masks, to skip a mask when
    # nothing is padded: decoders never are here (packed blocks; a seq2seq decoder's mask is the model's own
    # ones), an encoder's sources are (the mask is built, as for a batch of sources of several lengths); and
    # the token ids, to warn about padding
    with (mock.patch.object(masking_utils, "find_packed_sequence_indices", return_value=None),
          mock.patch.object(PreTrainedModel, "warn_if_padding_and_no_attention_mask", lambda *args: None),
          mock.patch.object(masking_utils, "_ignore_causal_mask_sdpa",
                            lambda padding_mask, *args, **kwargs: causal_skip(None, *args, **kwargs)),
          mock.patch.object(masking_utils, "_ignore_bidirectional_mask_sdpa", return_value=False),
          mock.patch("torch.nn.functional.scaled_dot_product_attention", attention_as_on(device)), live):
        start = live.reset_peak()
        out, loss = _forward(module, cfg, groups, spec)
        kept, forward_peak = live.live - start, live.peak - start
        before = live.reset_peak()
        if loss is not None:
            loss.backward()
        else:
            out.backward(torch.zeros_like(out))
        return kept, forward_peak, live.peak - before


def trace_chunk(module, cfg, groups, spec=None, device: str = "cpu") -> ChunkTrace:
    """One micro-batch of ``module`` (on the meta device) forward and backward under ``LiveBytes``, attention
    as on ``device``, twice: with no gradients yet (the first micro-batch of a step, whose backward makes them,
    and every micro-batch under ZeRO 2-3, where DeepSpeed moves them out of the parameters: here they are kept
    to the end of the backward, an upper bound) and with them allocated (accumulated in place)."""
    module.train()
    parameters = [p for p in module.parameters() if p.requires_grad]
    for p in parameters:
        p.grad = None
    kept, forward_peak, fresh = _traced_pass(module, cfg, groups, spec, device)
    for p in parameters:
        p.grad = torch.zeros_like(p)
    _, _, in_place = _traced_pass(module, cfg, groups, spec, device)
    for p in parameters:
        p.grad = None
    return ChunkTrace(kept=kept, forward_peak=forward_peak, backward_peak=in_place, fresh_backward_peak=fresh)


def in_flight_peak(traces: list[ChunkTrace], schedule: str, p: int, m: int, rank: int, v: int,
                   fresh: bool = False) -> tuple[int, int]:
    """(the most bytes kept by micro-batches in flight at once, the peak including the running operation's
    own transient, with the backwards making fresh gradients or not) over this rank's operation list of the
    schedule; one chunk and ``m`` micro-batches in turn without a pipeline."""
    from parallel.schedules import ORDERS, Op

    ops = (ORDERS[schedule](p, m, rank, v) if p > 1 else [Op(kind, 0, k) for k in range(m) for kind in "FB"])
    held = kept_peak = peak = 0
    for op in ops:
        trace = traces[op.chunk]
        if op.kind == "W":  # not modelled: ZB-H1 keeps the linear layers' inputs and output gradients until W
            continue
        if op.kind == "F":
            peak = max(peak, held + trace.forward_peak)
            held += trace.kept
            kept_peak = max(kept_peak, held)
        else:
            peak = max(peak, held + (trace.fresh_backward_peak if fresh else trace.backward_peak))
            held -= trace.kept
    return kept_peak, peak


def _fake_world(world: int, rank: int) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def full_meta_model(cfg):
    """The whole model of ``cfg`` on the meta device, as the run builds it (a BPE tokenizer at its configured
    size; its special tokens are the byte-level tokenizer's)."""
    from modeling.build import auto_class, byte_level_tokenizer, load_tokenizer
    from modeling.materialize import empty_model
    from training.loop import run_model_config

    choice = cfg.model.tokenizer or (cfg.model.pretrained if cfg.model.pretrained else "byte")
    directory = choice not in ("byte", "bpe")
    tokenizer = load_tokenizer(choice, cfg.model.trust_remote_code) if directory else byte_level_tokenizer()
    hf = run_model_config(cfg, tokenizer, cfg.model.bpe_vocab_size if choice == "bpe" else None)
    model = empty_model(auto_class(hf), hf, cfg.model.trust_remote_code)
    return model if cfg.precision == "fp32" else model.to(getattr(torch, {"bf16": "bfloat16"}.get(cfg.precision,
                                                                                               "float16")))


@dataclass
class StageShape:
    """What a stage's memory follows from, whatever the data-parallel degree and ZeRO stage: its parameters,
    its largest layer's, its tied embedding's (pipelines) and its chunks' traces."""

    stage: int
    params: int
    largest_layer: int
    tied: int
    traces: list[ChunkTrace]


def stage_shape(cfg, full, stage: int, device: str = "cpu", traced: dict | None = None) -> StageShape:
    """Pipeline stage ``stage`` of the layout of ``cfg`` (tensor rank 0; the others hold the same). ``traced``:
    traces of chunks already seen in this layout, by what a chunk is (its blocks' count and kinds, whether it
    embeds, whether it has the head): the middle stages of a pipeline are traced once."""
    from bench.memory import largest_layer_params
    from parallel.groups import ProcessGroups, rank_grid
    from training.loop import rank_model

    t, p = cfg.parallel.tensor, cfg.parallel.pipeline
    if cfg.parallel.partition == "measured":  # no probe under the fake world: parameter counts stand in for times
        cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"partition": "parameters"})})
    _fake_world(t * p, int(rank_grid(t, p, 1)[stage, 0, 0]))
    groups = ProcessGroups.from_degrees(tensor=t, pipeline=p)
    model, pipeline = rank_model(cfg, full, groups)
    modules = [module.to("meta") for module in (pipeline[0] if pipeline else [model])]  # buffers made on the host too
    traced = {} if traced is None else traced
    traces = []
    for module in modules:
        spec = module.spec if pipeline else None
        kind = (len(spec.blocks), tuple(module.layer_types), spec.embed, spec.head) if spec else None
        if kind not in traced:
            traced[kind] = trace_chunk(module, cfg, groups, spec, device)
        traces.append(traced[kind])
    tied = pipeline[1].numel() if pipeline and pipeline[1] is not None else 0
    return StageShape(stage=stage, params=sum(x.numel() for module in modules for x in module.parameters()),
                      largest_layer=max(largest_layer_params(module) for module in modules), tied=tied,
                      traces=traces)


def model_state_bytes(params: int, zero_stage: int, data: int, largest_layer: int, precision: str) -> dict:
    """``bench.memory.memory_formula_bytes`` (fp32); in bf16/fp16, DeepSpeed's mixed precision: 16-bit weights
    and gradients, fp32 master weights and AdamW moments (the ZeRO paper's 2 + 2 + 12 bytes per parameter)."""
    from bench.memory import memory_formula_bytes

    state = memory_formula_bytes(params, zero_stage, data, largest_layer)
    if precision != "fp32":
        state["param_bytes"] /= 2
        state["gradient_bytes"] /= 2
        state["master_bytes"] = 4 * params / (data if zero_stage >= 1 else 1)
        state["gathered_layer_bytes"] /= 2
    return state


def stage_memory(shape: StageShape, cfg, data: int, zero_stage: int, micro_batches: int) -> StagePlan:
    """The planned memory of the stage at ``data`` data-parallel ranks, ``zero_stage`` and ``micro_batches``."""
    state = model_state_bytes(shape.params, zero_stage, data, shape.largest_layer, cfg.precision)
    schedule = (shape.traces, cfg.parallel.schedule, cfg.parallel.pipeline, micro_batches, shape.stage,
                cfg.parallel.virtual_stages)
    kept, in_place = in_flight_peak(*schedule)
    _, fresh = in_flight_peak(*schedule, fresh=True)
    # ZeRO 0-1: the gradients are model state; the step's first backward makes them (they are freed after
    # each step). ZeRO 2-3: every backward makes full gradients before DeepSpeed reduces them into its partition.
    gradients = shape.params * (2 if cfg.precision != "fp32" else 4)
    running = fresh if zero_stage >= 2 else max(in_place, fresh - gradients)
    state_bytes, tied = sum(state.values()), 4 * shape.tied
    step_partition = 4 * shape.params / data if zero_stage in (1, 2) else 0
    return StagePlan(stage=shape.stage, params=shape.params, model_state=state, activations=kept,
                     traces=shape.traces, steps=state_bytes + tied + max(running, 2 * tied),
                     optimizer=state_bytes + step_partition)


def layout_shapes(cfg, full=None, device: str = "cpu") -> list[StageShape]:
    """Every pipeline stage of the layout of ``cfg``, attention as on ``device``."""
    import torch.distributed as dist

    full = full if full is not None else full_meta_model(cfg)
    try:
        traced = {}
        return [stage_shape(cfg, full, stage, device, traced) for stage in range(cfg.parallel.pipeline)]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def plan_layout(cfg, data: int, full=None, device: str = "cpu") -> list[StagePlan]:
    return [stage_memory(shape, cfg, data, cfg.parallel.zero_stage, cfg.train.grad_accum)
            for shape in layout_shapes(cfg, full, device)]


def _layout_config(config: str, overrides: list[str], text: str):
    """(config of the layout string, its data-parallel degree) for ``bench.memory.parse_layout`` strings."""
    from bench.memory import parse_layout
    from training.config import load

    _, sets, nproc = parse_layout(text)
    cfg = load(config, overrides + sets)
    return cfg, nproc // (cfg.parallel.tensor * cfg.parallel.pipeline)


def memory_run(results: Path) -> tuple[str, list[str]]:
    """(config file, overrides) of the ``bench memory`` command that wrote ``results``."""
    command = shlex.split(json.loads(results.read_text())["command"])
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    known, _ = parser.parse_known_args(command[command.index("memory") + 1:])
    return known.config, known.set


def _row(label: str, cfg, data: int, stages: list[StagePlan]) -> dict:
    worst = max(stages, key=lambda s: s.peak)
    return {"layout": label, "data": data, "zero": cfg.parallel.zero_stage,
            "recompute": cfg.parallel.activation_checkpointing, "stage": worst.stage, "params": worst.params,
            "model_state_bytes": sum(worst.model_state.values()), "activation_bytes": worst.activations,
            "steps_bytes": worst.steps, "optimizer_bytes": worst.optimizer, "peak_bytes": worst.peak}


def plan_table(rows: list[dict]) -> str:
    mb = lambda b: f"{b / MIB:,.0f}"  # noqa: E731
    checked = "measured_bytes" in rows[0]
    head = ((["run"] if checked else []) + ["layout", "ZeRO", "recompute", "largest stage", "params/rank",
            "model state MB", "activations MB", "steps MB", "optimizer MB", "planned peak MB"]
            + (["measured MB", "error"] if checked else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (([r["run"]] if checked else []) + [
            r["layout"], str(r["zero"]), r["recompute"], str(r["stage"]), f"{r['params'] / 1e6:.1f} M",
            mb(r["model_state_bytes"]), mb(r["activation_bytes"]), mb(r["steps_bytes"]), mb(r["optimizer_bytes"]),
            mb(r["peak_bytes"])] + ([mb(r["measured_bytes"]), f"{r['error']:+.1%}"] if checked else []))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def measured_peaks(results: Path) -> dict[str, int]:
    """Layout label -> the largest rank's peak above its runtime over the training phases (load, steps,
    optimizer) in a ``bench memory`` results.json."""
    out = {}
    for record in json.loads(results.read_text())["ranks"]:
        if record.get("status") != "ok":
            continue
        out[record["layout"]] = max(r[f"{phase}_peak_bytes"] - r["runtime_bytes"] for r in record["ranks"]
                                    for phase in ("load", "steps", "optimizer") if f"{phase}_peak_bytes" in r)
    return out


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidates(args, world: int, global_batch: int):
    """(label, config, data degree) of every layout of ``world`` ranks the run's own checks accept, with the
    global batch of ``global_batch`` sequences split into micro-batches of the config's size."""
    from modeling.pipeline import check_pipeline_fits
    from modeling.tp_plans import check_tensor_parallel_fits
    from training.config import load

    base = load(args.config, args.set)
    micro = base.train.micro_batch_size
    modes = ("none", "selective", "full") if args.recompute == "all" else (base.parallel.activation_checkpointing,)
    hf = full_meta_model(base).config
    for t, p in ((t, p) for t in _divisors(world) if t <= args.max_tensor for p in _divisors(world // t)):
        data = world // (t * p)
        if global_batch % (micro * data):
            continue
        for zero, mode in itertools.product((0, 1, 2, 3), modes):
            sets = [f"parallel.tensor={t}", f"parallel.pipeline={p}", f"parallel.zero_stage={zero}",
                    f"parallel.activation_checkpointing={mode}", f"train.grad_accum={global_batch // (micro * data)}"]
            try:
                check_tensor_parallel_fits(hf, t)
                check_pipeline_fits(hf, p, base.parallel.virtual_stages, base.parallel.partition)
                cfg = load(args.config, args.set + sets)
            except ValueError:
                continue
            yield f"tensor={t},pipeline={p},data={data}", cfg, data


def flops_per_token(recompute: str, params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Hardware FLOPs per token of a training step (Megatron's count): 6 per parameter plus the attention
    scores and weighted sum (12 x layers x hidden x seq_len forward and backward), plus what recomputation runs
    again: the whole forward of the blocks for ``full`` (2 per parameter and the attention's forward, 4 x
    layers x hidden x seq_len), the attention's forward for ``selective``."""
    attention_forward = 4 * layers * hidden * seq_len
    again = {"none": 0, "selective": attention_forward, "full": 2 * params + attention_forward}[recompute]
    return 6 * params + 3 * attention_forward + again


def step_seconds(cfg, hf, data: int, stages: list[StagePlan], fits: dict, device_flops: float) -> dict:
    """A step-time estimate: the step's FLOPs (``flops_per_token``, recomputation included) at
    ``device_flops`` per rank, stretched by the pipeline bubble (p - 1) / (v m), plus the communication the
    fits predict, not overlapped: per micro-batch and block 4 tensor-parallel all-reduces of the hidden states
    (forward 2, backward 2), per step the data-parallel reduction of the gradients (ZeRO-3: the parameters
    gathered in the forward and the backward too, per micro-batch), per micro-batch and chunk boundary a send
    of the hidden states each way."""
    from bench.comm import predict_seconds

    par, m = cfg.parallel, cfg.train.grad_accum
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    width = 2 if cfg.precision != "fp32" else 4
    params = sum(s.params for s in stages) * par.tensor
    per_token = flops_per_token(par.activation_checkpointing, params, hf.num_hidden_layers, hf.hidden_size,
                                cfg.data.seq_len)
    compute = per_token * tokens * m * data / (par.tensor * par.pipeline * data * device_flops)
    bubble = (par.pipeline - 1) / (par.virtual_stages * m)
    hidden_bytes = tokens * width * hf.hidden_size
    layers = hf.num_hidden_layers / par.pipeline
    tp = 4 * layers * m * predict_seconds(fits["all_reduce"], hidden_bytes) if par.tensor > 1 else 0.0
    grads = width * max(s.params for s in stages)
    dp = 0.0
    if data > 1:
        dp = predict_seconds(fits["all_reduce"], grads)
        if par.zero_stage == 3:
            dp += 2 * m * predict_seconds(fits["all_gather"], grads)
    pp = 2 * m * par.virtual_stages * predict_seconds(fits["send_recv"], hidden_bytes) if par.pipeline > 1 else 0.0
    total = compute * (1 + bubble) + tp + dp + pp
    return {"step_s": total, "compute_s": compute, "bubble": bubble, "tp_s": tp, "dp_s": dp, "pp_s": pp,
            "tokens_per_s": tokens * m * data / total}


def search(args) -> list[dict]:
    """Every candidate layout planned; those whose largest rank fits ``args.device_memory``, fastest first."""
    fits = json.loads(Path(args.comm_fit).read_text())["fit"]
    rows, shapes, full = [], {}, None
    for label, cfg, data in candidates(args, args.world_size, args.global_batch or 0):
        full = full if full is not None else full_meta_model(cfg)
        par = cfg.parallel
        key = (par.tensor, par.pipeline, par.activation_checkpointing)
        if key not in shapes:  # the traces do not depend on ZeRO or the data-parallel degree
            shapes[key] = layout_shapes(cfg, full, args.device)
        stages = [stage_memory(s, cfg, data, par.zero_stage, cfg.train.grad_accum) for s in shapes[key]]
        row = {**_row(label, cfg, data, stages), "micro_batches": cfg.train.grad_accum,
               **step_seconds(cfg, full.config, data, stages, fits, args.device_tflops * 1e12)}
        row["fits"] = row["peak_bytes"] <= args.device_memory
        rows.append(row)
    return sorted(rows, key=lambda r: (not r["fits"], -r["tokens_per_s"], r["peak_bytes"]))


def search_table(rows: list[dict], top: int) -> str:
    lines = ["| layout | ZeRO | recompute | micro-batches | planned peak GiB | fits | est. tokens/s | compute s | "
             "bubble | TP comm s | DP comm s | PP comm s |", "|" + "---|" * 12]
    for r in rows[:top]:
        lines.append(f"| {r['layout']} | {r['zero']} | {r['recompute']} | {r['micro_batches']} | "
                     f"{r['peak_bytes'] / 2**30:.1f} | {'yes' if r['fits'] else 'no'} | {r['tokens_per_s']:,.0f} | "
                     f"{r['compute_s']:.3f} | {r['bubble']:.0%} | {r['tp_s']:.3f} | {r['dp_s']:.3f} | {r['pp_s']:.3f} |")
    return "\n".join(lines) + "\n"


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '512MiB', '1e9' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    return int(float(lowered))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run config (YAML); with --check, each results file's own")
    parser.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    parser.add_argument("--layout", action="append", default=[], help="tensor=N,pipeline=N,data=N,zero=N "
                        "(repeatable; default: the config's own at one data-parallel rank)")
    parser.add_argument("--check", action="append", default=[], help="a `bench memory` results.json (repeatable): "
                        "plan its layouts with its own config and overrides and compare with the measured peaks")
    parser.add_argument("--device-memory", type=parse_bytes, help="memory per device, e.g. 80GiB: search the "
                        "layouts of --world-size ranks that fit")
    parser.add_argument("--world-size", type=int)
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step in the search (default: "
                        "micro_batch_size x grad_accum x world size)")
    parser.add_argument("--recompute", choices=("config", "all"), default="config",
                        help="search the config's recomputation mode or all three")
    parser.add_argument("--max-tensor", type=int, default=8, help="largest tensor-parallel degree searched "
                        "(one node's GPUs)")
    parser.add_argument("--device-tflops", type=float, default=989.0, help="dense TFLOP/s per device for the "
                        "compute estimate (H100 bf16: 989)")
    parser.add_argument("--comm-fit", default="bench/results/comm-cpu2-2026-11-24.json",
                        help="a `bench comm` results file: its latency/bandwidth fits price the communication")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the devices the run trains on: which attention kernel the activations follow "
                        "(default: this machine's)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", help="a directory for results.json (the rows) and report.md")
    args = parser.parse_args(argv)
    if not args.config and not args.check:
        parser.error("--config is required (or --check with bench memory results)")
    if (args.device_memory is None) != (args.world_size is None):
        parser.error("--device-memory and --world-size go together")
    _check_search(args)
    try:
        rows, text = _search_text(args) if args.device_memory is not None else _plan_text(args)
    except (ValueError, OSError, KeyError) as exc:  # a bad config, layout or file: one line, no traceback
        fail("bench plan", str(exc))
    print(text)
    if args.out:
        _write(Path(args.out), rows, text, argv)
    if args.check and any(abs(r["error"]) > 0.15 for r in rows):
        print("bench plan: some layouts are more than 15% off the measured peak", file=sys.stderr)
    return rows


def _check_search(args) -> None:
    """The search's numbers, each at least 1 (a device's memory: more than nothing), before anything is built."""
    for flag in ("world_size", "global_batch", "max_tensor", "top"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            fail("bench plan", f"--{flag.replace('_', '-')} {value}: must be at least 1")
    for flag in ("device_memory", "device_tflops"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            fail("bench plan", f"--{flag.replace('_', '-')} {value}: must be positive")


def _search_text(args) -> tuple[list[dict], str]:
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


def _plan_text(args) -> tuple[list[dict], str]:
    rows = plan_rows(args)
    return rows, plan_table(rows)


def _write(out: Path, rows: list[dict], text: str, argv) -> None:
    from bench.machine import describe

    machine = describe()
    command = "python -m bench plan " + " ".join(argv if argv is not None else sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine, "command": command, "rows": rows}, indent=1))
    (out / "report.md").write_text(f"# Memory plan ({machine['date']}, {machine['cpu']}, torch {machine['torch']})"
                                   f"\n\n`{command}`\n\n{text}")


def plan_rows(args) -> list[dict]:
    """One row per layout: ``--layout`` (or the config's own) of ``--config``, or every layout of each
    ``--check`` results file, planned with that run's own config and overrides, next to its measured peak."""
    if not args.check:
        return [_planned_row(args.config, args.set, text, args.device) for text in args.layout or [""]]
    rows = []
    for results in map(Path, args.check):
        config, overrides = memory_run(results)
        for text, measured in measured_peaks(results).items():
            row = _planned_row(config, overrides + args.set, text, args.device)
            row.update(run=results.parent.name, measured_bytes=measured, error=row["peak_bytes"] / measured - 1)
            rows.append(row)
    return rows


def _planned_row(config: str, overrides: list[str], text: str, device: str) -> dict:
    cfg, data = _layout_config(config, overrides, text)
    return _row(text or _describe(cfg), cfg, data, plan_layout(cfg, data, device=device))


def _describe(cfg) -> str:
    par = cfg.parallel
    return f"tensor={par.tensor},pipeline={par.pipeline}" + (",sequence_parallel" if par.sequence_parallel else "")


if __name__ == "__main__":
    main()
