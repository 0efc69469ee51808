"""``train.compile``: every transformer block's forward compiled with ``torch.compile`` (per block, as
TorchTitan's ``apply_compile`` and Megatron do), on the HF modules themselves, so the tensor-parallel plan, the
pipeline chunks (which call the same blocks), ZeRO and recomputation see the same model.

- **Where the graphs end.** colonnade's tensor-parallel layers (collectives as autograd functions,
  ``parallel.comm``, recorded by the flight recorder) and the module hooks inside a block (the region entries,
  the per-rank dropout generator's spans, ``parallel.random``) run as written, opaque to dynamo: the graphs end
  before each and resume after it, in program order. No collective is traced into a graph, reordered or dropped.
  ``parallel.lean_activations`` steps aside (``training.assembly.rank_model``): its saved-tensor hooks would
  break the graphs, and inductor's partitioner chooses what the compiled forward keeps and recomputes.
  Under full recomputation the checkpoint (its ``context_fn`` restores the tensor-parallel generator, which dynamo
  cannot trace) runs eagerly around the compiled forward.
- **Random numbers.** Inductor's own generator would draw other dropout masks than eager (and ignore the
  per-rank generator states that ``parallel.random`` swaps in between graphs); ``fallback_random`` makes the
  compiled blocks draw through aten's generator, the masks eager draws, so a compiled run is an eager run up to
  the fp32 rounding of fused kernels, and recomputation (``modeling.recompute``) redraws the forward's masks.
- **Shapes.** ``dynamic=False``: a training micro-batch has one shape (packed blocks of ``data.seq_len``, a fixed
  micro-batch size), so static kernels, compiled once per block type. The compiled forward runs only in training
  with gradients on; evaluation and decoding (a KV cache, a new length every token) run the same blocks eagerly,
  so they add no recompilation. A shape that recompiles past dynamo's limit is an error, not a silent fall back to
  eager (``fail_on_recompile_limit_hit``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from training.config import ConfigError, RunConfig

OPTIONS: dict[str, Any] = {"fallback_random": True}  # dropout masks drawn through aten's generator, as eager


def _refusal(cfg: RunConfig) -> str | None:
    par = cfg.parallel
    if par.zero_stage == 3:
        return ("train.compile with parallel.zero_stage=3: ZeRO-3 gathers and frees every layer's parameters in "
                "module hooks inside the block, so their shapes change within a forward and dynamo recompiles at "
                "each until its limit; set parallel.zero_stage to 0, 1 or 2, or train.compile=false")
    for key, value in (("parallel.context", par.context), ("parallel.expert", par.expert)):
        if value > 1:
            return (f"train.compile with {key}={value}: its all-to-all inside the blocks is not compiled and "
                    f"tested; set {key}=1 or train.compile=false")
    return None


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The model's outermost transformer blocks (transformers' ``GradientCheckpointingLayer`` s: decoder layers,
    an encoder-decoder's blocks of both stacks)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(name.startswith(f"{outer}.")
                                                                       for outer, _ in found):
            found.append((name, module))
    return [module for _, module in found]


def _eager_islands(block: nn.Module) -> None:
    """colonnade's tensor-parallel layers (``parallel``'s modules: collectives, the dropout generator's spans)
    and every module hook inside ``block`` (the region entries, the sequence-parallel dropout spans) run as
    written, opaque to dynamo: the graphs end before them and resume after them."""
    for module in block.modules():
        if type(module).__module__.split(".")[0] == "parallel":
            module.forward = torch._dynamo.disable(module.forward, recursive=True)
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                hooks[key] = torch._dynamo.disable(hook, recursive=True)


def _compile_forward(block: Any) -> None:
    """In training with gradients on, ``block`` runs its model's forward compiled; under full recomputation that
    compiled forward is what transformers' checkpoint (with the tensor-parallel generator's ``context_fn``, which
    dynamo cannot trace) calls, eagerly, in the forward and again in the backward."""
    eager = block.forward
    own = getattr(type(block).forward, "__wrapped__", type(block).forward)  # without transformers' checkpointing
    compiled = torch.compile(own, dynamic=False, options=OPTIONS)  # the block an argument: one graph per type

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not (block.training and torch.is_grad_enabled()):  # evaluation, decoding: eager (see the docstring)
            return eager(*args, **kwargs)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            if block.gradient_checkpointing:
                return block._gradient_checkpointing_func(partial(compiled, block, **kwargs), *args)
            return compiled(block, *args, **kwargs)

    block.forward = forward


def compile_blocks(model: Any, cfg: RunConfig) -> None:
    """With ``train.compile``, compile every transformer block's forward of this rank's ``model`` (after its
    tensor-parallel, recomputation, tiling and context-parallel set-up; before its pipeline chunks are cut).
    ConfigError naming the keys where the composition is refused."""
    if not cfg.train.compile:
        return
    refusal = _refusal(cfg)
    if refusal is not None:
        raise ConfigError(refusal)
    blocks = _blocks(model)
    if not blocks:
        raise ConfigError(f"train.compile: model_type {model.config.model_type!r} has no transformer blocks "
                          f"(transformers' GradientCheckpointingLayer) to compile; set train.compile=false")
    for block in blocks:
        _eager_islands(block)
        _compile_forward(block)
