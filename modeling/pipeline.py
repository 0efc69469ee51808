"""Split an HF decoder into pipeline chunks by its own declaration (``config.base_model_pp_plan``: the modules
before the block list embed, the block list, the modules after it end the stack), and run each chunk through the
model's own forward.

A chunk is a shell of the HF model: a shallow copy whose block list holds only this chunk's blocks, whose
embedding modules are absent unless it embeds, and whose final modules are identities unless it holds the head;
its config copy says how many blocks it has and their ``layer_types``. Calling the shell runs the architecture's
own forward, so whatever that forward does between the parts (an embedding scale, the attention masks of each
layer type, rotary embeddings, logit soft-capping or scaling) happens on every chunk as on one process. A chunk
that does not embed gets the previous stage's hidden states at its first module (``StageInput``): the embedding
path it runs is only the shape of the input. Only hidden states cross a stage boundary.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from modeling.experts import SplitRouterLoss
from parallel.partition import StageSpec, stage_specs
from parallel.weight_grad import WeightGradStore, linear


@dataclass(frozen=True)
class StagePlan:
    """Where a decoder keeps its pipeline parts: ``base`` (the base model's attribute in the causal LM),
    the base model's modules before the block list (``embed``), the block list (``blocks``), and after it
    (``final``: the final norm)."""

    base: str
    embed: tuple[str, ...]
    blocks: str
    final: tuple[str, ...]


# Blocks whose mask the model's own forward builds from the stage's config: the layer types a chunk runs.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}

# Hand-written where transformers declares no base_model_pp_plan: GPT-2 (GPT2Model.forward's order).
HAND_WRITTEN = {"gpt2": StagePlan(base="transformer", embed=("wte", "wpe", "drop"), blocks="h", final=("ln_f",))}


def declared_stage_plan(config: PretrainedConfig, base: str) -> StagePlan:
    """The StagePlan of ``config``'s ``base_model_pp_plan``: the entry whose inputs include the attention mask
    is the block list. ValueError naming what is missing."""
    declared = getattr(config, "base_model_pp_plan", None)
    if not declared:
        raise ValueError(f"model_type {config.model_type!r} declares no base_model_pp_plan (transformers), and "
                         f"colonnade has no hand-written stage split for it (have {sorted(HAND_WRITTEN)})")
    names = list(declared)
    blocks = [name for name, (inputs, _) in declared.items() if "attention_mask" in inputs]
    if len(blocks) != 1:
        raise ValueError(f"model_type {config.model_type!r}: base_model_pp_plan {names} does not name one block "
                         f"list (the entry taking attention_mask)")
    at = names.index(blocks[0])
    return StagePlan(base=base, embed=tuple(names[:at]), blocks=blocks[0], final=tuple(names[at + 1:]))


def stage_plan(model: PreTrainedModel) -> StagePlan:
    """``model``'s StagePlan: hand-written, else from its declaration, else read from the order of its base
    model's modules (``inferred_stage_plan``)."""
    model_type = model.config.model_type
    if model_type in HAND_WRITTEN:
        return HAND_WRITTEN[model_type]
    if getattr(model.config, "base_model_pp_plan", None):
        return declared_stage_plan(model.config, model.base_model_prefix)
    return inferred_stage_plan(model)


def inferred_stage_plan(model: PreTrainedModel) -> StagePlan:
    """For a model that declares no pipeline plan (Nemotron, NanoChat): its base model's one ``nn.ModuleList`` is
    the block list, the modules with parameters before it embed, those after it end the stack, as the declared
    plans of the other decoders say. ValueError when there is not exactly one block list."""
    base = model.base_model_prefix
    children = list(model.get_submodule(base).named_children())
    lists = [i for i, (_, child) in enumerate(children) if isinstance(child, nn.ModuleList)]
    if len(lists) != 1:
        raise ValueError(f"model_type {model.config.model_type!r} declares no base_model_pp_plan and its base model "
                         f"has {len(lists)} module lists, not one list of blocks")
    at = lists[0]
    holding = [name for name, child in children if any(True for _ in child.parameters())]
    before = {name for name, _ in children[:at]}
    final = tuple(n for n in holding if n not in before and n != children[at][0])
    return StagePlan(base=base, embed=tuple(n for n in holding if n in before), blocks=children[at][0], final=final)


def _base(model: PreTrainedModel, plan: StagePlan) -> nn.Module:
    return model.get_submodule(plan.base)


def blocks_of(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder's list of transformer blocks."""
    plan = stage_plan(model)
    blocks = _base(model, plan).get_submodule(plan.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{plan.base}.{plan.blocks} is a {type(blocks).__name__}, not the nn.ModuleList of blocks")
    return blocks


def blocks_path(model: PreTrainedModel) -> str:
    plan = stage_plan(model)
    return f"{plan.base}.{plan.blocks}"


def num_blocks(model: PreTrainedModel) -> int:
    return len(blocks_of(model))


def check_stage_modules(model: PreTrainedModel, setting: str = "parallel.pipeline", needs_plan: bool = True) -> None:
    """Every module of the base model that holds parameters must be one of the declared parts: anything else
    (Gemma 3n's per-layer embeddings) would be copied onto every stage, and feeds the blocks inputs a
    sequence shard does not match. ValueError naming it and ``setting``; without a stage plan, ValueError when
    ``needs_plan`` (a pipeline), else nothing to check."""
    model_type = model.config.model_type
    try:
        plan = stage_plan(model)
    except ValueError as error:
        if not needs_plan:
            return  # no stage split to compare the modules with
        raise ValueError(f"{setting}: {error}; turn {setting.split('=')[0]} off") from None
    parts = {*plan.embed, plan.blocks, *plan.final}
    stray = [name for name, child in _base(model, plan).named_children()
             if name not in parts and any(True for _ in child.parameters())]
    if stray:
        raise ValueError(f"{setting}: model_type {model_type!r} has parameters in "
                         f"{[f'{plan.base}.{n}' for n in stray]}, outside the embedding, blocks and final norm of its "
                         f"pipeline plan {sorted(parts)} (inputs the blocks get besides the hidden states); turn "
                         f"{setting.split('=')[0]} off")


class StageState:
    """What a chunk's forward hands to its stand-in modules and back: the hidden states received from the
    previous stage, and those its last block gave (each set for the duration of one forward)."""

    received: torch.Tensor | None = None
    sent: torch.Tensor | None = None


class _Wrapper(nn.Module):
    """A block in a chunk's shell; attributes are read through to it (forwards ask blocks for their
    ``attention_type``)."""

    def __init__(self, inner: nn.Module, state: StageState):
        super().__init__()
        self.inner, self.state = inner, state

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


class StageInput(_Wrapper):
    """The chunk's first module: it runs on the received hidden states instead of what the shell's embedding
    path computed (the argument is only that path's shape)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        received = self.state.received
        if "hidden_states" in kwargs:
            return self.inner(*args, **dict(kwargs, hidden_states=received))
        return self.inner(received, *args[1:], **kwargs)


class StageOutput(_Wrapper):
    """The chunk's last block when another stage holds the head: keeps the hidden states it gives, for the chunk
    to send, whatever the forward does after the blocks (GPT-2 reshapes them by the input's sequence length,
    which a sequence-parallel shard does not have; NanoChat's weightless final norm also runs before them)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        self.state.sent = out[0] if isinstance(out, tuple) else out
        return out


class Absent(nn.Module):
    """An embedding held by another stage: zeros of the shape it would return (a broadcast view, no storage)."""

    def __init__(self, dim: int, state: StageState):
        super().__init__()
        self.dim, self.state = dim, state

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        like = self.state.received
        assert like is not None, "an absent embedding runs only inside a chunk's forward"
        return like.new_zeros(()).expand(*ids.shape, self.dim)


def _shell(module: nn.Module, children: dict[str, nn.Module], config: PretrainedConfig) -> nn.Module:
    """A shallow copy of ``module`` with its own module table (``children`` replacing entries), hook tables and
    config: the original is untouched."""
    shell = copy.copy(module)
    for name, value in vars(module).items():
        if name.startswith("_") and isinstance(value, dict):
            setattr(shell, name, OrderedDict(value))
    shell._modules.update(children)
    shell.config = config  # type: ignore[assignment]  # torch's stub: Module attributes Tensor | Module only
    return shell


def _stage_config(config: PretrainedConfig, blocks: range) -> PretrainedConfig:
    """The config the shell's forward reads: its block count, and the layer types of its blocks."""
    staged = copy.copy(config)
    staged.num_hidden_layers = len(blocks)
    if isinstance(getattr(config, "layer_types", None), list):
        staged.layer_types = [config.layer_types[i] for i in blocks]
    return staged


def _embedding_width(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"cannot stand in for {type(module).__name__}: expected an embedding with a 2-D weight")
    return int(getattr(module, "embedding_dim", weight.shape[1]))


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


class PipelineChunk(nn.Module):
    """One model chunk. ``forward(x)``: token ids on the first chunk, hidden states elsewhere; returns
    hidden states, or the (vocabulary-sharded) logits on the last chunk."""

    def __init__(self, model: PreTrainedModel, spec: StageSpec, seq_len: int,
                 router_loss: SplitRouterLoss | None = None, positions: torch.Tensor | None = None):
        super().__init__()
        # a context-parallel rank's tokens are not the first seq_len of the sequence: their position ids
        self.register_buffer("positions", positions, persistent=False)
        plan = stage_plan(model)
        self.spec, self.seq_len, self.state = spec, seq_len, StageState()
        # With the model's load-balancing loss a forward also takes the router totals of the stages before and
        # leaves them, this chunk's layers added, in ``router_totals``.
        self.router_loss = router_loss
        self.router_totals: torch.Tensor | None = None
        base = _base(model, plan)
        children = self._stand_ins(base, plan)
        children[plan.blocks] = nn.ModuleList(self._blocks(model, plan, children))
        config = _stage_config(model.config, spec.blocks)
        shell = _shell(base, children, config)
        self.hidden_size = _embedding_width(model.get_input_embeddings())
        self.model = _shell(model, {plan.base: shell}, config) if spec.head else shell

    def _stand_ins(self, base: nn.Module, plan: StagePlan) -> dict[str, nn.Module]:
        """The base model's parts this chunk does not hold: absent embeddings, identities for the final norm."""
        parts: dict[str, nn.Module] = {}
        if not self.spec.embed:
            parts.update({name: Absent(_embedding_width(base.get_submodule(name)), self.state)
                          for name in plan.embed if _holds_parameters(base.get_submodule(name))})
        if not self.spec.head:
            parts.update({name: nn.Identity() for name in plan.final if _holds_parameters(base.get_submodule(name))})
        return parts

    def _blocks(self, model: PreTrainedModel, plan: StagePlan, children: dict[str, nn.Module]) -> list[nn.Module]:
        """This chunk's blocks, the first taking the received hidden states, the last keeping those it sends."""
        layers: list[nn.Module] = [blocks_of(model)[i] for i in self.spec.blocks]
        if not self.spec.embed:
            if layers:
                layers[0] = StageInput(layers[0], self.state)
            elif plan.final and self.spec.head:
                final = plan.final[0]
                children[final] = StageInput(_base(model, plan).get_submodule(final), self.state)
            else:
                raise ValueError(f"a pipeline chunk needs blocks, the embedding or the head: {self.spec}")
        if layers and not self.spec.head:
            layers[-1] = StageOutput(layers[-1], self.state)
        return layers

    @property
    def head(self) -> nn.Module | None:
        return cast(PreTrainedModel, self.model).get_output_embeddings() if self.spec.head else None

    def forward(self, x: torch.Tensor, router_totals: torch.Tensor | None = None) -> torch.Tensor:
        inputs: dict[str, Any] = {"use_cache": False}
        positions = cast(torch.Tensor | None, self.positions)
        if positions is not None:
            inputs["position_ids"] = positions.expand(x.shape[0], -1)
        out, hidden = self.run(x, self.seq_len, **inputs)
        if self.router_loss is not None:
            totals = router_totals if router_totals is not None else self.router_loss.start(x)
            self.router_totals = self.router_loss.add(totals, out.router_logits or ())
        return out.logits if hidden is None else hidden

    def run(self, x: torch.Tensor, seq_len: int, **model_inputs: Any) -> tuple[Any, torch.Tensor | None]:
        """The shell's forward on ``x`` (``seq_len`` positions of the whole sequence) with ``model_inputs`` (a
        decoding cache, masks, positions): (the model's output, the hidden states to send on)."""
        try:
            if self.spec.embed:
                out = self.model(input_ids=x, **model_inputs)
            else:
                self.state.received = x
                shape = x.new_zeros(()).expand(x.shape[0], seq_len, self.hidden_size)
                out = self.model(inputs_embeds=shape, **model_inputs)
            sent = self.state.sent
            return out, sent if sent is not None or self.spec.head else out.last_hidden_state
        finally:
            self.state.received = self.state.sent = None


def split_chunks(model: PreTrainedModel, specs: list[StageSpec], seq_len: int,
                 positions: torch.Tensor | None = None) -> nn.ModuleList:
    """This rank's chunks (in local order) as one module, ready to be wrapped by DeepSpeed; ``positions``: the
    position ids of a context-parallel rank's tokens."""
    check_stage_modules(model, "parallel.pipeline")
    router_loss = SplitRouterLoss(model) if SplitRouterLoss.applies(model) else None
    return nn.ModuleList(PipelineChunk(model, spec, seq_len, router_loss, positions) for spec in specs)


def defer_weight_grads(module: nn.Module, store: WeightGradStore) -> None:
    """Every linear layer of ``module`` leaves its weight gradient to ``store`` (a zero-bubble schedule's W
    pass): our tensor-parallel layers read their ``weight_grad_store``; HF's ``nn.Linear`` and GPT-2's
    ``Conv1D`` (Y = X W + b) get a forward through ``parallel.weight_grad.linear``."""
    for sub in module.modules():
        if hasattr(type(sub), "weight_grad_store"):
            sub.weight_grad_store = store  # type: ignore[assignment]  # torch's stub: Module attributes Tensor | Module only
        elif isinstance(sub, (nn.Linear, Conv1D)):
            sub.forward = partial(_deferring_forward, sub, store, isinstance(sub, Conv1D))  # type: ignore[method-assign]


def _deferring_forward(layer: nn.Linear | Conv1D, store: WeightGradStore, transposed: bool,
                       x: torch.Tensor) -> torch.Tensor:
    return linear(x, layer.weight, layer.bias, store, transposed)


def check_pipeline_fits(hf_config: PretrainedConfig, pipeline: int, virtual_stages: int, partition: str) -> None:
    """Raise ValueError for a pipeline split the model cannot take (before any model is built)."""
    if pipeline == 1:
        return
    if hf_config.model_type not in HAND_WRITTEN and getattr(hf_config, "base_model_pp_plan", None):
        try:
            declared_stage_plan(hf_config, "model")
        except ValueError as error:
            raise ValueError(f"parallel.pipeline={pipeline}: {error}; use parallel.pipeline=1") from None
    other = sorted(set(getattr(hf_config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES)
    if other:
        raise ValueError(f"parallel.pipeline={pipeline}: model config field layer_types has {other} (layers that "
                         f"are not attention: state-space or linear attention), which colonnade does not split into "
                         f"pipeline stages yet; use parallel.pipeline=1")
    layers = hf_config.num_hidden_layers
    chunks = pipeline * virtual_stages
    if virtual_stages > 1 and layers % chunks:
        raise ValueError(f"parallel.virtual_stages={virtual_stages} x parallel.pipeline={pipeline} = {chunks} "
                         f"chunks do not divide the model's {layers} layers")
    balanced_later = partition in ("parameters", "measured")  # balanced once the model exists: any cut fits
    stage_specs(layers, pipeline, virtual_stages, "uniform" if balanced_later else partition)
