"""The analytic formulas the bench commands set their measurements against, in one place: model-state bytes
per rank under ZeRO (the ZeRO paper's terms, DeepSpeed's fp32 master partition, the largest layer ZeRO-3
gathers), the optimizer step's gradient partition, a dense model's parameter count and the FLOPs per token of a
training step. ``bench memory`` and ``bench sweep`` compare what a run holds with them; ``bench plan`` adds
them to its traced activations. Plain arithmetic on counts: nothing here imports torch, training or another
bench command."""

from __future__ import annotations


def zero_formula_bytes(params: int, zero_stage: int, dp: int) -> dict:
    """Per-rank model-state bytes for pure fp32 AdamW (ZeRO paper, Rajbhandari et al. 2020, section 5, with
    fp32 in place of mixed precision): parameters 4Ψ (4Ψ/N under ZeRO-3), gradients 4Ψ (4Ψ/N from ZeRO-2 on),
    optimizer state (exp_avg + exp_avg_sq) 8Ψ, or 8Ψ/N from ZeRO-1."""
    return {"param_bytes": 4 * params / (dp if zero_stage == 3 else 1),
            "gradient_bytes": 4 * params / (dp if zero_stage >= 2 else 1),
            "optimizer_state_bytes": 8 * params / (dp if zero_stage >= 1 else 1)}


def model_state_bytes(params: int, zero_stage: int, dp: int, largest_layer: int = 0,
                      precision: str = "fp32") -> dict:
    """The model state a rank holds for ``params`` parameters: ``zero_formula_bytes`` (weights, gradients,
    moments) plus, from ZeRO-1 on, the fp32 master partition DeepSpeed's ZeRO optimizers keep beside the
    weights even in fp32 training (4 bytes / dp per parameter; the paper's K = 12 counts it too), plus, under
    ZeRO-3, the largest layer gathered in full with its full gradient (DeepSpeed's
    ``estimate_zero3_model_states_mem_needs``: 4 bytes per parameter of that layer in 16-bit, 8 in fp32). In
    bf16/fp16, DeepSpeed's mixed precision: 16-bit weights and gradients, fp32 master weights and AdamW moments
    (the ZeRO paper's 2 + 2 + 12 bytes per parameter), the master copy then kept at every ZeRO stage."""
    state = zero_formula_bytes(params, zero_stage, dp)
    state["master_bytes"] = 4 * params / dp if zero_stage >= 1 else 0
    state["gathered_layer_bytes"] = 8 * largest_layer if zero_stage == 3 else 0
    if precision != "fp32":
        state["param_bytes"] /= 2
        state["gradient_bytes"] /= 2
        state["master_bytes"] = 4 * params / (dp if zero_stage >= 1 else 1)
        state["gathered_layer_bytes"] /= 2
    return state


def step_partition_bytes(params: int, zero_stage: int, dp: int) -> float:
    """What the optimizer step adds under ZeRO 1-2: the fp32 gradient partition DeepSpeed flattens for its
    optimizer (4 bytes per parameter / data-parallel degree)."""
    return 4 * params / dp if zero_stage in (1, 2) else 0


def largest_layer_params(module) -> int:
    """Parameters of the module holding the most directly (DeepSpeed's ``model_to_params`` rule), unpartitioned
    (ZeRO-3 keeps the size in ``ds_numel``): the layer ``model_state_bytes`` has ZeRO-3 gather."""
    return max((sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters(recurse=False))
                for m in module.modules()), default=0)


def dense_params(layers: int, hidden: int, ffn: int, vocab: int) -> int:
    """A decoder's parameter count N as PaLM counts it: per block the attention's 4 h² and the MLP's 2 h ffn,
    plus the (tied) token embedding."""
    return layers * (4 * hidden * hidden + 2 * hidden * ffn) + vocab * hidden


def flops_per_token(recompute: str, params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Hardware FLOPs per token of a training step (Megatron's count): 6 per parameter plus the attention
    scores and weighted sum (12 x layers x hidden x seq_len forward and backward), plus what recomputation runs
    again: the whole forward of the blocks for ``full`` (2 per parameter and the attention's forward, 4 x
    layers x hidden x seq_len), the attention's forward for ``selective``."""
    attention_forward = 4 * layers * hidden * seq_len
    again = {"none": 0, "selective": attention_forward, "full": 2 * params + attention_forward}[recompute]
    return 6 * params + 3 * attention_forward + again
