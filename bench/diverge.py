"""Where do two layouts part ways? One training step of the same config, from the same weights and the same
global batch, under two layouts; every module's forward output and input gradient and every parameter's
gradient and updated value are captured (gathered to full tensors), and the first difference is named.

    python -m bench diverge --config X --layout tensor=2,pipeline=2 --against tensor=1 [--set k=v ...]

Each layout runs under torchrun. The report names, in this order, the first module in execution order whose
forward output differs; else the first module in backward order whose input gradient differs; else the first
parameter whose gradient, then whose updated value, differs; each beyond ``--tol`` (the largest absolute
difference over the largest magnitude of the tensor). Exit code 0 when everything is equal, 1 when something
differs. Outputs are matched sample by sample (by their tokens), so the layouts may split the global batch
differently (``micro_batch_size`` x ``grad_accum`` x data). Meant for small models: every activation of the
step is saved. Recomputed forwards are not captured; outputs sharded by attention heads (inside attention,
no weight of their own) are listed as not comparable. Nothing here names a model family: a rank's piece is
placed by its module's weight (``_spec``), and a module called several times per micro-batch is compared call
by call (``_call_name``, ``_per_micro_batch``)."""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import torch

from bench.variant import Variant
from training.events import Observer

PROG = "bench diverge"
DROPOUT_FIELD = re.compile(r"dropout|pdrop|layerdrop")  # attn_pdrop, attention_dropout, dropout_rate, encoder_layerdrop

# Every variant starts from one process; what differs is only what its --layout / --against says.
NEUTRAL = ["parallel.tensor=1", "parallel.pipeline=1", "parallel.sequence_parallel=false", "parallel.schedule=1f1b",
           "parallel.virtual_stages=1"]
FORCED = ["train.steps=1", "train.save_final=false", "train.save_every=0", "train.export_hf=false",
          "train.progress=false", "train.eval_first=false", "logging.wandb.mode=disabled",
          "optim.warmup_steps=0"]  # one step: the full learning rate, whatever the warm-up


# --------------------------------------------------------------------------------------------- capture

class _Recorder:
    """Hooks on every module and parameter of one rank's model for the run's single step."""

    def __init__(self, model, local_params, groups, cfg):
        self.groups, self.cfg = groups, cfg
        self.outputs, self.out_specs, self.input_grads, self.in_specs = {}, {}, {}, {}
        self.order, self.pre_order, self.param_grads = [], [], {}
        self.handles = []
        for name, module in model.named_modules():
            if name and not isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                self.handles.append(module.register_forward_pre_hook(self._pre(name, module), prepend=True,
                                                                     with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._post(name, module), with_kwargs=True))
        for name, param in local_params.items():
            if param.requires_grad:
                self.handles.append(param.register_hook(self._param_grad(name)))

    def _pre(self, name, module):
        def hook(mod, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            if _in_backward() or not isinstance(x, torch.Tensor) or not x.requires_grad:
                return None
            key = _call_name(name, args, kwargs)
            if key not in self.input_grads:
                self.pre_order.append(key)
            calls = self.input_grads.setdefault(key, [])
            index = len(calls)
            calls.append(None)
            self.in_specs[key] = _spec(module, x, self.groups, self.cfg, "input")
            # a view of its own: its gradient is this module's contribution, not that of every reader of x
            own = x.view_as(x)
            own.register_hook(lambda g: calls.__setitem__(index, g.detach().clone()))
            if "hidden_states" in kwargs:
                return args, dict(kwargs, hidden_states=own)
            return (own,) + tuple(args[1:]), kwargs
        return hook

    def _post(self, name, module):
        def hook(mod, args, kwargs, output):
            out = _first_tensor(output)
            if _in_backward() or out is None:
                return None
            key = _call_name(name, args, kwargs)
            if key not in self.outputs:
                self.order.append(key)
            self.outputs.setdefault(key, []).append(out.detach().clone())
            self.out_specs[key] = _spec(module, out, self.groups, self.cfg, "output")
            return None
        return hook

    def _param_grad(self, name):
        def hook(grad):
            previous = self.param_grads.get(name)
            self.param_grads[name] = grad.detach().clone() if previous is None else previous + grad.detach()
            return grad
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _call_name(name: str, args, kwargs) -> str:
    """The capture's name of one call of module ``name``: the module's, with the call's string arguments in
    brackets when it has any (Gemma 3's rotary embedding runs once per layer type,
    ``rotary_emb(x, positions, "sliding_attention")``, in the order of a ``set``, which differs between
    processes): calls that compute different things are compared apart."""
    words = [v for v in (*args, *kwargs.values()) if isinstance(v, str)]
    return f"{name}[{','.join(words)}]" if words else name


def _per_micro_batch(calls: dict, specs: dict, order: list, micro_batches: int) -> tuple[dict, dict, list]:
    """Captures of a module called k > 1 times per micro-batch (k x ``micro_batches`` calls: one embedding
    shared by a sequence-to-sequence model's encoder and decoder) split into k captures of one call per
    micro-batch, ``name``, ``name#2``, ...: the j-th call of each micro-batch, so that each is matched with the
    samples of its own micro-batch. A micro-batch's calls are consecutive on a rank (its forward ends before the
    next one's begins)."""
    out, out_specs, out_order = {}, {}, []
    for name in order:
        values = calls[name]
        k = len(values) // micro_batches if len(values) % micro_batches == 0 else 1
        for j in range(max(k, 1)):
            key = name if j == 0 else f"{name}#{j + 1}"
            out[key], out_specs[key] = (values[j::k] if k > 1 else values), specs[name]
            out_order.append(key)
    return out, out_specs, out_order


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1  # a recomputation inside the backward


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _spec(module, tensor, groups, cfg, side: str) -> tuple:
    """(dim, ranges, size): where this rank's ``tensor`` lies in the full one along ``dim``; dim None: whole;
    "sum": the full one is the sum over the tensor ranks (a column-parallel layer's input gradient). A
    column-parallel layer's output and a row-parallel layer's input follow their weight's shard; under
    sequence parallelism a tensor holding 1/TP of the sequence is the rank's contiguous part of it."""
    from parallel.layers import shard_ranges

    world, rank = groups.tensor, groups.tp_rank
    if world == 1:
        return (None, (), 0)
    weight = getattr(module, "weight", None)
    sharded = weight is not None and getattr(weight, "tensor_model_parallel", False)
    vector = tuple(getattr(weight, "ds_shape", ())) or (tuple(weight.shape) if weight is not None else ())
    vector = vector if len(vector) == 1 else ()  # a 1-D weight's size (ZeRO-3 keeps it in ds_shape)
    if sharded and vector and tensor.shape[-1] == vector[0]:
        # an elementwise weight over a split width (a norm over a column layer's split output, OLMo 2's q/k
        # norms): its input, output and their gradients are this rank's slice of that width
        ranges, _ = shard_ranges(weight.tp_full_size, rank, world, weight.tp_fused_chunks, vector[0] * world)
        return (tensor.dim() - 1, tuple(ranges), weight.tp_full_size)
    if not sharded and vector and tensor.dim() == 4 and tensor.shape[-1] == vector[0]:
        # a per-head module with a weight of head_dim kept whole (Qwen3's and Gemma 3's q/k norms) on
        # (batch, sequence, heads, head_dim) (Qwen3) or (batch, heads, sequence, head_dim) (Gemma 3): this rank's
        # heads, the rank-th block of them, along the dimension that is not the sequence
        heads_dims = [d for d in (1, 2) if tensor.shape[d] != cfg.data.seq_len]
        if len(heads_dims) == 1:
            heads = tensor.shape[heads_dims[0]]
            return (heads_dims[0], ((rank * heads, (rank + 1) * heads),), heads * world)
    column = sharded and weight.dim() == 2 and weight.partition_dim == 0
    if side == "input" and column and getattr(module, "entry", None) is None:
        return ("sum", (), 0)  # entered by its parent: inside the region each rank's gradient is a partial sum
    sharded_dim = {"output": 0, "input": 1}[side]
    if (weight is not None and getattr(weight, "tensor_model_parallel", False)
            and weight.partition_dim == sharded_dim and weight.dim() == 2
            and tensor.shape[-1] == weight.shape[sharded_dim]):
        ranges, _ = shard_ranges(weight.tp_full_size, rank, world, weight.tp_fused_chunks,
                                 weight.shape[sharded_dim] * world)
        return (tensor.dim() - 1, tuple(ranges), weight.tp_full_size)  # a padded vocabulary: its real size
    if cfg.parallel.sequence_parallel and tensor.dim() >= 2 and tensor.shape[1] * world == cfg.data.seq_len:
        part = tensor.shape[1]
        return (1, ((rank * part, (rank + 1) * part),), cfg.data.seq_len)
    return (None, (), 0)


def _full_param(model, name, tensor, groups):
    """The whole value of ``name``, as the HF model holds it, from this rank's ``tensor`` (collective over the
    tensor group)."""
    from modeling.shards import full_tensor

    return full_tensor(model, name, tensor, groups.tp_group)


def _finish(recorder, model, local_params, groups, batches, micro_batches: int) -> dict:
    """After the step: gradients averaged over the data-parallel group and merged over the tensor group,
    updated parameters (gathered from ZeRO-3 partitions), this rank's input tokens per micro-batch."""
    import deepspeed
    import torch.distributed as dist

    micro = {"outputs": _per_micro_batch(recorder.outputs, recorder.out_specs, recorder.order, micro_batches),
             "input_grads": _per_micro_batch(recorder.input_grads, recorder.in_specs, recorder.pre_order,
                                             micro_batches)}
    grads, params = {}, {}
    for name, param in local_params.items():
        grad = recorder.param_grads.get(name)
        if grad is not None:
            grad = grad.clone()
            dist.all_reduce(grad, group=groups.dp_group)
            grads[name] = _full_param(model, name, grad / groups.data, groups)
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            params[name] = _full_param(model, name, param.detach().clone(), groups)
    inputs = [batches.batch(0, k)["input_ids"] for k in range(micro_batches)]
    return {"layout": {"tensor": groups.tensor, "pipeline": groups.pipeline, "data": groups.data,
                       "tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank, "dp_rank": groups.dp_rank},
            "order": micro["outputs"][2], "pre_order": micro["input_grads"][2], "outputs": micro["outputs"][0],
            "out_specs": micro["outputs"][1],
            "input_grads": micro["input_grads"][0], "in_specs": micro["input_grads"][1],
            "grads": grads, "params": params, "inputs": inputs}


def dropout_fields(config, prefix: str = "") -> dict[str, float]:
    """Every dropout probability of an HF config, whatever the architecture calls it: each number-valued field
    whose name has ``dropout``, ``pdrop`` or ``layerdrop`` in it, in nested configs (encoder, decoder, text)
    too; dotted name -> value."""
    from transformers import PretrainedConfig

    found = {}
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            found.update(dropout_fields(value, f"{prefix}{name}."))
        elif DROPOUT_FIELD.search(name) and isinstance(value, (int, float)) and not isinstance(value, bool):
            found[prefix + name] = value
    return found


def without_dropout(config):
    """``config`` with every ``dropout_fields`` probability set to 0 (in place; returned)."""
    for dotted in dropout_fields(config):
        *path, name = dotted.split(".")
        owner = config
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, 0.0)
    return config


class _Capture(Observer):
    """The run's events, for its one step: ``on_built`` gives the model, engine, groups and batches; the ``step``
    phase's start hooks this rank's modules and parameters (``_Recorder``), its end removes the hooks and gathers
    what they caught (``_finish``: collectives over the data-parallel and tensor groups, every rank at the same
    step boundary)."""

    def __init__(self):
        self.captured: dict = {}
        self._run = None
        self._recorder = None
        self._local: dict = {}

    def on_built(self, run) -> None:
        self._run = run

    def on_phase_start(self, phase: str, step: int) -> None:
        if phase != "step":
            return
        run = self._run
        held = {id(p) for p in run.engine.module.parameters()}
        self._local = {n: p for n, p in run.model.named_parameters() if id(p) in held}
        self._recorder = _Recorder(run.model, self._local, run.groups, run.cfg)

    def on_phase_end(self, phase: str, step: int, record) -> None:
        if phase != "step" or self._recorder is None:
            return
        run, recorder = self._run, self._recorder
        recorder.remove()
        self._recorder = None
        self.captured.update(_finish(recorder, run.model, self._local, run.groups, run.batches,
                                     run.cfg.train.grad_accum))


def capture(cfg, out_dir: str, keep_dropout: bool = False) -> None:
    """Rank function: train ``cfg`` for its one step with every capture on (``_Capture``, an observer of the run);
    write ``out_dir/rank{N}.pt``. The model is built with its dropout probabilities at 0 (the run's
    ``edit_model_config``) unless ``keep_dropout`` (under tensor parallelism each rank draws its own masks inside
    the parallel region: Megatron's RNG, different from one process by design)."""
    import torch.distributed as dist

    from training import run

    observer = _Capture()
    run(cfg, observers=[observer], edit_model_config=None if keep_dropout else without_dropout)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(observer.captured, Path(out_dir) / f"rank{dist.get_rank()}.pt")


# ---------------------------------------------------------------------------------------------- compare

def _place(shards: list[torch.Tensor], specs: list[tuple]) -> torch.Tensor:
    """The full tensor from the tensor-parallel ranks' pieces and their ``_spec``s, in rank order."""
    dim, _, size = specs[0]
    if dim is None:
        return shards[0]
    if dim == "sum":
        return torch.stack(shards).sum(dim=0)
    shape = list(shards[0].shape)
    shape[dim] = size
    full = torch.zeros(shape, dtype=shards[0].dtype)
    for shard, (_, ranges, _) in zip(shards, specs):
        offset = 0
        for start, stop in ranges:
            full.narrow(dim, start, stop - start).copy_(shard.narrow(dim, offset, stop - start))
            offset += stop - start
    return full


class Captures:
    """One variant's rank files (``capture``) assembled into full tensors: module captures as [global batch, ...]
    with the samples in a canonical order (sorted by their tokens), parameters whole, as the HF model holds
    them."""

    def __init__(self, directory: Path):
        self.ranks = [torch.load(f, weights_only=False) for f in sorted(Path(directory).glob("rank*.pt"))]
        if not self.ranks:
            raise SystemExit(f"bench diverge: no rank files in {directory}")
        first = self.ranks[0]["layout"]
        self.data = first["data"]
        stages = [self._stage_file(stage) for stage in range(first["pipeline"])]
        # forward outputs, in execution order (a module every chunk calls, a rotary embedding, where first seen)
        self.order = list(dict.fromkeys(n for stage in stages for n in stage["order"]))
        # input gradients, in the order the backward completes them: the reverse of the forward's entries
        self.backward_order = list(dict.fromkeys(n for stage in reversed(stages) for n in reversed(stage["pre_order"])))
        self.params, self.grads = {}, {}
        for rank in self.ranks:
            if rank["layout"]["tp_rank"] == 0 and rank["layout"]["dp_rank"] == 0:
                for name in rank["params"]:
                    self.params.setdefault(name, rank["params"][name])
                    if name in rank["grads"]:
                        self.grads.setdefault(name, rank["grads"][name])
        self.outputs = {n: self._assemble(n, "outputs", "out_specs", 1.0) for n in self.order}
        self.input_grads = {n: self._assemble(n, "input_grads", "in_specs", 1.0 / self.data)
                            for n in self.backward_order}

    def _stage_file(self, stage: int) -> dict:
        return next(r for r in self.ranks if r["layout"]["pp_rank"] == stage and r["layout"]["tp_rank"] == 0
                    and r["layout"]["dp_rank"] == 0)

    def _assemble(self, name: str, kind: str, specs: str, scale: float) -> torch.Tensor | None:
        """``name``'s captures over the global batch; the input gradients scaled by 1/DP (each rank's loss is
        the mean over its own samples; the single process's is over the global batch)."""
        rows = []
        holders = [r for r in self.ranks if name in r[kind]]
        if holders:  # a module every pipeline stage calls (a rotary embedding): the first stage's captures
            first = min(r["layout"]["pp_rank"] for r in holders)
            holders = [r for r in holders if r["layout"]["pp_rank"] == first]
        for dp_rank in range(self.data):
            group = sorted((r for r in holders if r["layout"]["dp_rank"] == dp_rank),
                           key=lambda r: r["layout"]["tp_rank"])
            if not group:
                return None
            inputs = next(r["inputs"] for r in self.ranks if r["layout"]["dp_rank"] == dp_rank)
            for micro, tokens in enumerate(inputs):
                shards = [r[kind][name][micro] if micro < len(r[kind][name]) else None for r in group]
                if any(s is None for s in shards):
                    return None
                full = _place(shards, [r[specs][name] for r in group])
                rows += [(tuple(t.tolist()), row) for t, row in zip(tokens, full)]
        rows.sort(key=lambda pair: pair[0])
        return torch.stack([row for _, row in rows]) * scale


def difference(a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[str, float | None]:
    """('equal' | 'differs' | 'missing' | 'not comparable', relative max difference)."""
    if a is None or b is None:
        return ("missing" if (a is None) != (b is None) else "not captured"), None
    if a.shape != b.shape:  # e.g. split by attention heads inside a module without a weight of its own
        return "not comparable", None
    scale = max(float(b.abs().max()), float(a.abs().max()), 1e-30)
    return "", float((a.double() - b.double()).abs().max()) / scale


def compare(dir_a: Path, dir_b: Path, tol: float) -> dict:
    """The first divergence of variant A (its captures in ``dir_a``) from variant B and a row per module and
    parameter."""
    a, b = Captures(dir_a), Captures(dir_b)
    order = b.order + [n for n in a.order if n not in b.order]
    modules, first = [], None
    for name in order:
        row = {"module": name}
        for kind in ("outputs", "input_grads"):
            status, rel = difference(getattr(a, kind).get(name), getattr(b, kind).get(name))
            row[kind] = (status or ("differs" if rel > tol else "equal"), rel)
        modules.append(row)
    forward = next((r for r in modules if r["outputs"][0] in ("differs", "missing")), None)
    by_name = {r["module"]: r for r in modules}
    backward = next((by_name[n] for n in b.backward_order if n in by_name
                     and by_name[n]["input_grads"][0] in ("differs", "missing")), None)
    params = []
    for name in sorted(set(a.params) | set(b.params)):
        params.append({"parameter": name,
                       "grads": _status(difference(a.grads.get(name), b.grads.get(name)), tol),
                       "params": _status(_updated_difference(a, b, name), tol)})
    if forward:
        first = ("forward output", forward["module"], forward["outputs"])
    elif backward:
        first = ("input gradient", backward["module"], backward["input_grads"])
    else:
        for kind, label in (("grads", "parameter gradient"), ("params", "updated parameter")):
            hit = next((p for p in params if p[kind][0] in ("differs", "missing")), None)
            if hit:
                first = (label, hit["parameter"], hit[kind])
                break
    return {"first": first, "modules": modules, "params": params, "tol": tol}


def _updated_difference(a: Captures, b: Captures, name: str) -> tuple[str, float | None]:
    """``difference`` of the updated values where the gradient is above 1e-3 of its largest entry: Adam's
    step is about lr x sign(gradient), so a rounding-level difference in a gradient near zero flips a step
    of the full learning rate."""
    after_a, after_b, grad = a.params.get(name), b.params.get(name), b.grads.get(name)
    if after_a is None or after_b is None or grad is None or after_a.shape != after_b.shape:
        return difference(after_a, after_b)
    decided = grad.abs() > 1e-3 * grad.abs().max()
    return difference(after_a[decided], after_b[decided]) if decided.any() else ("", 0.0)


def _status(result: tuple[str, float | None], tol: float) -> tuple[str, float | None]:
    status, rel = result
    return (status or ("differs" if rel > tol else "equal"), rel)


def report(result: dict, label_a: str, label_b: str, dropout: str = "") -> str:
    """The verdict line, ``dropout`` (what the comparison did with dropout) on the next, then the tables."""
    first = result["first"]
    head = (f"equal: every module output, input gradient, parameter gradient and updated value of {label_a} "
            f"matches {label_b} within {result['tol']:g}" if first is None else
            f"first divergence of {label_a} from {label_b}: {first[0]} of {first[1]}: "
            + (f"max |difference| {first[2][1]:.3g} of the largest value" if first[2][1] is not None
               else first[2][0]))
    lines = [head] + ([dropout] if dropout else [])
    lines += ["", "| module | forward output | input gradient |", "|---|---|---|"]
    lines += [f"| {r['module']} | {_cell(r['outputs'])} | {_cell(r['input_grads'])} |" for r in result["modules"]]
    lines += ["", "| parameter | gradient | updated value |", "|---|---|---|"]
    lines += [f"| {p['parameter']} | {_cell(p['grads'])} | {_cell(p['params'])} |" for p in result["params"]]
    return "\n".join(lines) + "\n"


def _cell(value: tuple[str, float | None]) -> str:
    status, rel = value
    return status if rel is None else f"{status} {rel:.1e}"


# ------------------------------------------------------------------------------------------------- main

def _variant(args, text: str) -> Variant:
    """(label, the config overrides of this ``--layout`` / ``--against`` variant: its parallel layout, ZeRO stage
    and dotted config keys, processes); its config checked as train.py would (one line, exit code 2)."""
    from bench.cli import check_config
    from bench.variant import parse_variant

    items = [item for item in text.split(",") if item]
    overrides = [item for item in items if "." in item.partition("=")[0]]  # parallel.schedule=gpipe, ...
    degrees = [item for item in items if item not in overrides]
    _, sets, nproc = parse_variant(",".join(degrees), PROG)
    sets = NEUTRAL + sets + overrides + _same_global_batch(args, dict(item.split("=", 1) for item in degrees))
    check_config(f"{PROG} --layout {text or '(one process)'}", args.config, args.set + sets + FORCED, nproc)
    return Variant(text, sets, nproc)


def _run_variant(args, variant: Variant, work: Path, index: int) -> Path:
    from bench.launch import first_error, torchrun

    label, sets, nproc = variant
    out = work / f"layout{index}"
    worker = ["--worker", "--config", args.config, "--out", str(out)]
    worker += ["--keep-dropout"] if args.keep_dropout else []
    proc = torchrun("bench.diverge", nproc, worker,
                    sets=args.set + sets + FORCED + [f"train.output_dir={work / f'run{index}'}"], port=29800 + index,
                    timeout=args.timeout)
    if proc.returncode != 0:
        log = (proc.stderr or "") + (proc.stdout or "")
        raise SystemExit(f"{PROG}: layout {label or 'one process'} failed: {first_error(log)}")
    return out


def _same_global_batch(args, degrees: dict) -> list[str]:
    """The config's global batch (micro_batch_size x grad_accum, one data-parallel rank) at every variant's
    ``degrees``: at data=d each rank takes grad_accum/d micro-batches, else micro_batch_size/d samples."""
    from bench.cli import fail
    from training.config import ConfigError, load

    try:
        cfg, data = load(args.config, args.set + FORCED), int(degrees.get("data", 1))
    except (ConfigError, OSError) as exc:
        fail(PROG, str(exc))
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    if accum % data == 0:
        return [f"train.grad_accum={accum // data}"]
    if micro % data == 0:
        return [f"train.micro_batch_size={micro // data}"]
    fail(PROG, f"data={data} divides neither train.grad_accum={accum} nor train.micro_batch_size={micro}; set them "
               f"so that it does (the global batch stays theirs)")


def dropout_note(args) -> str:
    """What the comparison does with the model's dropout, for the report's second line."""
    from modeling.build import hf_config
    from training.config import load

    cfg = load(args.config, args.set + FORCED)
    fields = {k: v for k, v in dropout_fields(hf_config(pretrained=cfg.model.pretrained, arch=cfg.model.arch,
                                                        config=cfg.model.config)).items() if v}
    listed = ", ".join(f"{k}={v:g}" for k, v in sorted(fields.items()))
    if not fields:
        return "dropout: the model has none (every dropout probability of its config is 0)"
    if args.keep_dropout:
        return (f"dropout: kept ({listed}; --keep-dropout): the comparison includes dropout, whose masks differ by "
                f"design under tensor parallelism (each rank draws its own inside the parallel region)")
    return f"dropout: off in both layouts ({listed} set to 0); --keep-dropout compares with it"


def _headed(text: str, argv) -> str:
    """``report.md``: the machine and date, the command, then the report as printed."""
    import shlex
    import sys

    from bench.machine import describe

    m = describe()
    command = "python -m bench diverge " + shlex.join(argv if argv is not None else sys.argv[1:])
    return (f"# bench diverge ({m['date']}, {m.get('gpu') or m['cpu']}, {m['cores']} cores, torch {m['torch']})\n\n"
            f"`{command}`\n\n{text}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench diverge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], help="config override for both layouts")
    parser.add_argument("--layout", default="", help="tensor=N,pipeline=N,data=N,zero=N and any dotted config "
                        "key=value for this layout only, e.g. parallel.schedule=interleaved (default: one process)")
    parser.add_argument("--against", default="", help="the layout to compare with (default: one process)")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative difference counted as a divergence")
    parser.add_argument("--keep-dropout", action="store_true", help="keep the model's dropout (default: every "
                        "dropout probability of its HF config set to 0 in both layouts; with dropout, tensor "
                        "parallelism's per-rank masks differ from one process by design)")
    parser.add_argument("--out", help="keep the captures and write report.md here")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from training.config import load

        capture(load(args.config, args.set), args.out, keep_dropout=args.keep_dropout)
        return
    variants = [_variant(args, args.layout), _variant(args, args.against)]  # both checked before either runs
    note = dropout_note(args)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="diverge-"))
    work.mkdir(parents=True, exist_ok=True)
    dir_a, dir_b = (_run_variant(args, variant, work, index) for index, variant in enumerate(variants))
    text = report(compare(dir_a, dir_b, args.tol), variants[0].label or "one process",
                  variants[1].label or "one process", note)
    print(text)
    if args.out:
        (work / "report.md").write_text(_headed(text, argv))
    raise SystemExit(0 if text.startswith("equal") else 1)

if __name__ == "__main__":
    main()
