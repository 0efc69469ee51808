"""``train.compile``: every transformer block's forward compiled with ``torch.compile`` (per block, as
TorchTitan's ``apply_compile`` and Megatron do), on the HF modules themselves, so the tensor-parallel plan, the
pipeline chunks (which call the same blocks), ZeRO and recomputation see the same model.

- **Where the graphs end.** The collectives are autograd functions around ``torch.distributed`` calls
  (``parallel.comm``) and the tensor-parallel dropout generator is swapped in by module hooks
  (``parallel.random``); dynamo breaks the graph at each and runs them as written, in program order, so a block
  under tensor or sequence parallelism is a few graphs between its collectives. No collective is traced into a
  graph, and none is reordered or dropped.
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

from typing import Any

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from parallel.groups import ProcessGroups
from training.config import ConfigError, RunConfig

OPTIONS: dict[str, Any] = {"fallback_random": True}  # dropout masks drawn through aten's generator, as eager


def _refusal(cfg: RunConfig, groups: ProcessGroups) -> str | None:
    par = cfg.parallel
    if par.zero_stage == 3:
        return ("train.compile with parallel.zero_stage=3: ZeRO-3 gathers and frees each layer's parameters in "
                "module hooks inside the block, which the compiled graphs cannot hold; set parallel.zero_stage to "
                "0, 1 or 2, or train.compile=false")
    if groups.context > 1:
        return (f"train.compile with parallel.context={groups.context}: the context-parallel attention (all-to-all "
                f"or ring) is not compiled and tested yet; set parallel.context=1 or train.compile=false")
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


def _compile_forward(block: nn.Module) -> None:
    eager = block.forward
    compiled = torch.compile(type(block).forward, dynamic=False, options=OPTIONS)  # the block an argument

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not (block.training and torch.is_grad_enabled()):  # evaluation, decoding: eager (see the docstring)
            return eager(*args, **kwargs)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            return compiled(block, *args, **kwargs)

    block.forward = forward


def compile_blocks(model: Any, cfg: RunConfig, groups: ProcessGroups) -> None:
    """With ``train.compile``, compile every transformer block's forward of this rank's ``model`` (after its
    tensor-parallel, recomputation, tiling and context-parallel set-up; before its pipeline chunks are cut).
    ConfigError naming the keys where the composition is refused."""
    if not cfg.train.compile:
        return
    refusal = _refusal(cfg, groups)
    if refusal is not None:
        raise ConfigError(refusal)
    blocks = _blocks(model)
    if not blocks:
        raise ConfigError(f"train.compile: model_type {model.config.model_type!r} has no transformer blocks "
                          f"(transformers' GradientCheckpointingLayer) to compile; set train.compile=false")
    for block in blocks:
        _compile_forward(block)
