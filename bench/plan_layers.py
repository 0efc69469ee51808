"""One transformer block's activations: the bytes a block of the rank's model keeps for its backward, traced on
the meta device (``trace_layer``, ``bench plan``) or measured in a run (``BlockWindow`` over ``bench memory``'s
saved tensors), next to Megatron's accounting (``bench.formulas.layer_activation_bytes``: Korthikanti et al.
2022 for a GPT block, its SwiGLU / grouped-query form for Llama-style blocks).

What "one block's activations" is here: whatever is counted between the start of the model's second block and
the start of its third (``BlockWindow``). That is the second block's kept tensors with its input (the first
operation that saves it is in the block) and without its output (first saved by the third block), as the paper
counts a layer; with full recomputation, the checkpoint keeps the next block's input instead, of the same size.
Tensors made once per model and shared by every block (the causal mask, RoPE's cos / sin) are not a layer's, nor
in the formula: the meta trace counts tensors from when they are made (before the first block), the run's
measurement counts saved tensors from their first saving, which can be in the first block (selective
recomputation's checkpoint saves the attention function's inputs, the s x s causal mask among them: 2.7 bytes
per token and hidden unit at GPT-2 12 x 768, 1,024 tokens, bf16), hence the second block. The difference of
whole-model traces at two layer counts is the same quantity provided the model runs without a KV cache, as
training does (``use_cache=False``): with transformers' default cache every block also keeps a copy of its keys
and values (GPT-2 12 x 768, bf16: 4 bytes per token and hidden unit more)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.formulas import decoder_shape, layer_activation_bytes


class _Reached(Exception):
    """The second block has started: the traced forward need not go further."""


class BlockWindow:
    """The most that ``meter.live`` (``LiveBytes`` or ``bench.memory.SavedActivations``) grew from the start of
    the second of ``blocks`` (consecutive blocks) to the start of the third (with two blocks: of the first to the
    second), over the forwards in training mode with gradients on (not a full recomputation's second forward,
    which runs in the backward). ``stop``: end the forward there."""

    def __init__(self, blocks, meter, stop: bool = False):
        self.meter, self.stop, self.bytes, self._start = meter, stop, 0, None
        first = 1 if len(blocks) >= 3 else 0
        self._handles = [blocks[first].register_forward_pre_hook(self._enter),
                         blocks[first + 1].register_forward_pre_hook(self._leave)]

    def _enter(self, module, args) -> None:
        backward = torch._C._current_graph_task_id() != -1  # a recomputation inside the backward
        self._start = self.meter.live if module.training and torch.is_grad_enabled() and not backward else None

    def _leave(self, module, args) -> None:
        if self._start is not None:
            self.bytes = max(self.bytes, self.meter.live - self._start)
            self._start = None
            if self.stop:
                raise _Reached

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class LayerTrace:
    """One block's activations on one rank: traced (or measured) bytes and Megatron's accounting of them."""

    kept: int
    formula: dict[str, float]
    reference: str  # which accounting: "Korthikanti" (GPT block) or "Megatron SwiGLU" (gated MLP, grouped queries)

    @property
    def ratio(self) -> float:
        return self.kept / self.formula["total"]


def _dropout(config, names: tuple[str, ...]) -> bool:
    return any(float(getattr(config, name, 0.0) or 0.0) > 0 for name in names)


def layer_formula(cfg, hf_config) -> tuple[dict[str, float], str]:
    """(``layer_activation_bytes`` of one block of the model of ``hf_config`` under the layout, recomputation
    mode and precision of ``cfg``, the accounting's name): the shape read by ``decoder_shape``, dropout from the
    config's attention and hidden dropout probabilities, the attention fused unless transformers' eager one."""
    shape = decoder_shape(hf_config)
    par = cfg.parallel
    attention = (getattr(hf_config, "_attn_implementation", None) or "eager").removeprefix("colonnade_selective_")
    formula = layer_activation_bytes(
        cfg.data.seq_len // par.context, cfg.train.micro_batch_size, shape.hidden, shape.heads, tensor=par.tensor,
        sequence_parallel=par.sequence_parallel, recompute=par.activation_checkpointing,
        element=4 if cfg.precision == "fp32" else 2,
        attention_dropout=_dropout(hf_config, ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")),
        hidden_dropout=_dropout(hf_config, ("resid_pdrop", "hidden_dropout", "hidden_dropout_prob")),
        fused_attention=attention != "eager", ffn=shape.intermediate, gated=shape.gated, kv_heads=shape.kv_heads,
        head_dim=shape.head_dim)
    plain = not shape.gated and shape.kv_heads == shape.heads and shape.attention_width == shape.hidden
    return formula, "Korthikanti" if plain else "Megatron SwiGLU" if shape.gated else "Megatron"


def trace_layer(cfg, full=None, device: str = "cpu") -> LayerTrace | None:
    """One block of the model of ``cfg`` as ``training.assembly.rank_model`` builds it for tensor rank 0 of its
    layout (TP / SP shards, recomputation mode, ``parallel.lean_activations``; one pipeline stage holds the same
    blocks), one micro-batch forward on the meta device under a fake process group, attention and dropout as on
    ``device``: the bytes it keeps (``BlockWindow`` over ``LiveBytes``) and its formula. None for encoder-decoder
    models and models of one block."""
    import torch.distributed as dist

    from bench.plan_trace import LiveBytes, fake_world, full_meta_model, meta_patches
    from modeling.pipeline import blocks_of
    from parallel.context import local_tokens
    from parallel.groups import ProcessGroups
    from training.assembly import rank_model

    if cfg.data.source_field:
        return None
    full = full if full is not None else full_meta_model(cfg)
    par = cfg.parallel
    fake_world(par.tensor * par.expert * par.context, 0)
    try:
        groups = ProcessGroups.from_degrees(tensor=par.tensor, expert=par.expert, context=par.context)
        model, _ = rank_model(cfg, full, groups)
        model = model.to("meta").train()
        blocks = list(blocks_of(model))
        if len(blocks) < 2:
            return None
        ids = torch.zeros(cfg.train.micro_batch_size, cfg.data.seq_len, dtype=torch.long, device="meta")
        positions = None
        if par.context > 1:
            ids, positions, _ = local_tokens(ids, ids, groups.cp_group)
        live = LiveBytes()
        window = BlockWindow(blocks, live, stop=True)
        with meta_patches(device), live:
            try:
                model.base_model(input_ids=ids, position_ids=positions, use_cache=False)
            except _Reached:
                pass
        window.remove()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    formula, reference = layer_formula(cfg, full.config)
    return LayerTrace(kept=window.bytes, formula=formula, reference=reference)


def layer_fields(cfg, full=None, device: str = "cpu") -> dict:
    """``trace_layer``'s result as a ``bench plan`` row's fields (none for a model it does not trace)."""
    traced = trace_layer(cfg, full, device)
    if traced is None:
        return {}
    return {"layer_bytes": traced.kept, "layer_formula_bytes": traced.formula["total"],
            "layer_reference": traced.reference, "lean": cfg.parallel.lean_activations}


def layer_table(rows: list[dict]) -> str:
    """Per-layer activations of ``bench plan``'s rows next to their accounting (and, with ``--check``, next to
    the per-layer bytes ``bench memory`` measured)."""
    rows = [r for r in rows if "layer_bytes" in r]
    if not rows:
        return ""
    mb = lambda b: f"{b / 2**20:,.2f}"  # noqa: E731
    checked = any("measured_layer_bytes" in r for r in rows)
    head = (["layout", "recompute", "lean", "per-layer MB", "accounting", "formula MB", "x formula"]
            + (["measured MB", "error"] if checked else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["layout"], r["recompute"], "on" if r["lean"] else "off", mb(r["layer_bytes"]),
                 r["layer_reference"], mb(r["layer_formula_bytes"]),
                 f"{r['layer_bytes'] / r['layer_formula_bytes']:.2f}"]
        if checked:
            measured = r.get("measured_layer_bytes")
            cells += ([mb(measured), f"{r['layer_bytes'] / measured - 1:+.1%}"] if measured else ["-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return ("\nOne transformer block's activations on tensor rank 0 (bench/plan_layers.py: from the start of the "
            "second block to the start of the third), next to Megatron's accounting "
            "(bench.formulas.layer_activation_bytes):\n\n" + "\n".join(lines) + "\n")
