"""``bench plan``'s memory of each pipeline stage of a layout: the stage's parameters counted on the real model
cut by the run's own code (``StageShape``), its chunks' traces (``bench.plan_trace``), the micro-batches the
schedule keeps in flight (``in_flight_peak``) and the model state and step transients of ``bench.formulas``
(``StagePlan``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.formulas import expert_layout_state_bytes, largest_layer_params, step_partition_bytes
from bench.plan_trace import ChunkTrace, fake_world, full_meta_model, trace_chunk


@dataclass
class StagePlan:
    """A stage's planned memory at one data-parallel degree, ZeRO stage and number of micro-batches."""

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


@dataclass
class StageShape:
    """What a stage's memory follows from, whatever the data-parallel degree and ZeRO stage: its parameters,
    its largest layer's, its tied embedding's (pipelines) and its chunks' traces."""

    stage: int
    params: int
    largest_layer: int
    tied: int
    traces: list[ChunkTrace]
    expert_params: int = 0  # of ``params``, this rank's block of routed experts (ZeRO partitions them over EDP)


def stage_shape(cfg, full, stage: int, device: str = "cpu", traced: dict | None = None) -> StageShape:
    """Pipeline stage ``stage`` of the layout of ``cfg`` (tensor rank 0; the others hold the same). ``traced``:
    traces of chunks already seen in this layout, by what a chunk is (its blocks' count and kinds, whether it
    embeds, whether it has the head): the middle stages of a pipeline are traced once."""
    from parallel.groups import ProcessGroups, rank_grid
    from training.assembly import rank_model

    t, p, e, c = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.expert, cfg.parallel.context
    if cfg.parallel.partition == "measured":  # no probe under the fake world: parameter counts stand in for times
        cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"partition": "parameters"})})
    # the smallest data-parallel degree with the layout's expert and context groups (each carved from data)
    fake_world(t * p * e * c, int(rank_grid(t, p, e * c)[stage, 0, 0]))
    groups = ProcessGroups.from_degrees(tensor=t, pipeline=p, expert=e, context=c)
    model, pipeline = rank_model(cfg, full, groups)
    modules = [module.to("meta") for module in (pipeline[0] if pipeline else [model])]  # buffers made on the host too
    traced = {} if traced is None else traced
    traces = []
    for module in modules:
        spec = module.spec if pipeline else None
        kind = (len(spec.blocks), block_kinds(module), spec.embed, spec.head) if spec else None
        if kind not in traced:
            traced[kind] = trace_chunk(module, cfg, groups, spec, device)
        traces.append(traced[kind])
    tied = pipeline[1].numel() if pipeline and pipeline[1] is not None else 0
    return StageShape(stage=stage, params=sum(x.numel() for module in modules for x in module.parameters()),
                      largest_layer=max(largest_layer_params(module) for module in modules), tied=tied,
                      traces=traces, expert_params=sum(x.numel() for module in modules for x in module.parameters()
                                                       if hasattr(x, "expert_range")))


def block_kinds(chunk) -> tuple:
    """The attention kinds of a pipeline chunk's blocks, as its forward reads them: the ``layer_types`` of the
    chunk's own config copy (``modeling.pipeline``: sliding / full per block for Gemma 3, Qwen2, ...); empty
    where the model has none (every block alike)."""
    return tuple(getattr(chunk.model.config, "layer_types", None) or ())


def stage_memory(shape: StageShape, cfg, data: int, zero_stage: int, micro_batches: int) -> StagePlan:
    """The planned memory of the stage at ``data`` data-parallel ranks, ``zero_stage`` and ``micro_batches``."""
    state = expert_layout_state_bytes(shape.params, zero_stage, data, shape.largest_layer, cfg.precision,
                                      shape.expert_params, cfg.parallel.expert)
    schedule = (shape.traces, cfg.parallel.schedule, cfg.parallel.pipeline, micro_batches, shape.stage,
                cfg.parallel.virtual_stages)
    kept, in_place = in_flight_peak(*schedule)
    _, fresh = in_flight_peak(*schedule, fresh=True)
    # ZeRO 0-1: the gradients are model state; the step's first backward makes them (they are freed after
    # each step). ZeRO 2-3: every backward makes full gradients before DeepSpeed reduces them into its partition.
    gradients = shape.params * (2 if cfg.precision != "fp32" else 4)
    running = fresh if zero_stage >= 2 else max(in_place, fresh - gradients)
    state_bytes, tied = sum(state.values()), 4 * shape.tied
    step_partition = (step_partition_bytes(shape.params - shape.expert_params, zero_stage, data)
                      + step_partition_bytes(shape.expert_params, zero_stage, data // cfg.parallel.expert))
    return StagePlan(stage=shape.stage, params=shape.params, model_state=state, activations=kept,
                     traces=shape.traces, steps=state_bytes + tied + max(running, 2 * tied),
                     optimizer=state_bytes + step_partition)


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


def plan_row(label: str, cfg, data: int, stages: list[StagePlan]) -> dict:
    worst = max(stages, key=lambda s: s.peak)
    return {"layout": label, "data": data, "zero": cfg.parallel.zero_stage,
            "recompute": cfg.parallel.activation_checkpointing, "stage": worst.stage, "params": worst.params,
            "model_state_bytes": sum(worst.model_state.values()), "activation_bytes": worst.activations,
            "steps_bytes": worst.steps, "optimizer_bytes": worst.optimizer, "peak_bytes": worst.peak}

