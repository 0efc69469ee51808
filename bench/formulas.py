"""The analytic formulas the bench commands set their measurements against, in one place: model-state bytes
per rank under ZeRO (the ZeRO paper's terms, DeepSpeed's fp32 master partition, the largest layer ZeRO-3
gathers), the optimizer step's gradient partition, a dense model's parameter count and the FLOPs per token of a
training step. ``bench memory`` and ``bench sweep`` compare what a run holds with them; ``bench plan`` adds
them to its traced activations. Plain arithmetic on counts: nothing here imports torch, training or another
bench command (``decoder_shape`` reads attributes of an HF config it is given)."""

from __future__ import annotations

from dataclasses import dataclass


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


def expert_layout_state_bytes(params: int, zero_stage: int, dp: int, largest_layer: int = 0,
                              precision: str = "fp32", expert_params: int = 0, expert: int = 1) -> dict:
    """``model_state_bytes`` of a rank whose ``params`` include ``expert_params`` of routed experts under
    expert parallelism ``expert``: ZeRO partitions those over their own data-parallel group (dp / expert
    ranks), the rest over all ``dp``."""
    state = model_state_bytes(params - expert_params, zero_stage, dp, largest_layer, precision)
    if expert_params:
        experts = model_state_bytes(expert_params, zero_stage, dp // expert, 0, precision)
        state = {key: value + experts[key] for key, value in state.items()}
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


@dataclass(frozen=True)
class DecoderShape:
    """A decoder's shape as its HF config gives it, whatever the family calls the fields (``decoder_shape``)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated: bool  # gate and up projections (SwiGLU / GeGLU: three MLP matrices), else two

    @property
    def attention_width(self) -> int:
        """The width of the queries (heads x head_dim): the hidden size for Llama-7B or Qwen3-8B, not for
        Gemma 3, whose heads are wider."""
        return self.heads * self.head_dim


def decoder_shape(config) -> DecoderShape:
    """The shape of a decoder-only HF config, read by transformers' common field names (GPT-2's are mapped
    onto them by its ``attribute_map``): ``num_key_value_heads`` defaults to the heads, ``head_dim`` to hidden /
    heads (OLMo 2 and Phi-3 leave it out), ``tie_word_embeddings`` to tied. The MLP is gated when the config
    names its width ``intermediate_size`` (Llama, Mistral, Qwen2/3, Gemma 3, OLMo 2, Phi-3), two matrices
    when GPT-2's ``n_inner`` (default 4 x hidden)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    intermediate = getattr(config, "intermediate_size", None)
    return DecoderShape(
        layers=config.num_hidden_layers, hidden=hidden,
        intermediate=intermediate or getattr(config, "n_inner", None) or 4 * hidden,
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads, vocab=config.vocab_size,
        tied=getattr(config, "tie_word_embeddings", True), gated=intermediate is not None)


def decoder_params(shape: DecoderShape) -> dict[str, int]:
    """The weight matrices of a decoder of ``shape``: per block the attention's q, k, v (h x (heads + 2 kv
    heads) x head_dim: fused q|k|v as Phi-3's is the same count) and output (heads x head_dim x h), the MLP's
    2 or 3 h x ffn (fused gate|up the same), and the token embedding, twice when the output head is untied.
    Norm weights and biases are not counted: what a real model holds beyond ``total`` is those vectors (q/k
    norms of head_dim per block for Qwen3 and Gemma 3, of the full q and k widths for OLMo 2)."""
    s = shape
    attention = s.layers * (s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + s.attention_width * s.hidden)
    mlp = s.layers * (3 if s.gated else 2) * s.hidden * s.intermediate
    embeddings = s.vocab * s.hidden * (1 if s.tied else 2)
    return {"attention": attention, "mlp": mlp, "embeddings": embeddings, "total": attention + mlp + embeddings}


def flops_per_token(recompute: str, params: int, layers: int, hidden: int, seq_len: int,
                    attention_width: int | None = None) -> float:
    """Hardware FLOPs per token of a training step (Megatron's count): 6 per parameter plus the attention
    scores and weighted sum (12 x layers x width x seq_len forward and backward, the width that of the queries,
    ``attention_width``, by default the hidden size), plus what recomputation runs again: the whole forward of
    the blocks for ``full`` (2 per parameter and the attention's forward, 4 x layers x width x seq_len), the
    attention's forward for ``selective``. Every layer attends to the whole sequence (a sliding window's
    shorter span is not taken off)."""
    attention_forward = 4 * layers * (attention_width or hidden) * seq_len
    again = {"none": 0, "selective": attention_forward, "full": 2 * params + attention_forward}[recompute]
    return 6 * params + 3 * attention_forward + again


def context_attention_bytes(method: str, micro: int, seq_len: int, heads: int, kv_heads: int, head_dim: int,
                            context: int, width: int = 4) -> dict[str, float]:
    """Bytes one rank of a context group of ``context`` sends for one attention layer and one micro-batch of
    ``micro`` sequences of ``seq_len`` tokens (``parallel.context``), forward and backward, its ``heads`` and
    ``kv_heads`` of ``head_dim`` (per tensor-parallel rank) at ``width`` bytes per value, counted as the flight
    recorder counts them (``parallel.flight.bytes_sent``: an all-to-all sends (N-1)/N of its input, a send all
    of its tensor). ``ulysses``: four all-to-alls in the forward, of q, k, v (this rank's s/N tokens, every head;
    key/value heads fewer than N are repeated to N) and of the output (s tokens of heads/N, as many values as
    q), the same four of their gradients in the backward. ``ring``: N-1 sends of this rank's key/value block (and
    its int64 token positions) in the forward, the same in the backward plus N sends of the block's dk/dv
    accumulators, kept in fp32 or wider."""
    if context == 1:
        return {"forward": 0.0, "backward": 0.0}
    local = micro * seq_len // context  # this rank's tokens
    if method == "ulysses":
        kv = kv_heads if kv_heads % context == 0 else context
        moved = (context - 1) / context * local * (2 * heads + 2 * kv) * head_dim * width
        return {"forward": moved, "backward": moved}
    if method != "ring":
        raise ValueError(f"context attention {method!r}: ulysses or ring")
    block = 2 * local * kv_heads * head_dim * width + 8 * local
    accumulators = 2 * local * kv_heads * head_dim * max(width, 4)
    return {"forward": float((context - 1) * block), "backward": float((context - 1) * block + context * accumulators)}


def layer_activation_bytes(seq: int, micro: int, hidden: int, heads: int, *, tensor: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none", element: int = 2,
                           attention_dropout: bool = True, hidden_dropout: bool = True, fused_attention: bool = False,
                           ffn: int | None = None, gated: bool = False, kv_heads: int | None = None,
                           head_dim: int | None = None) -> dict[str, float]:
    """Bytes one transformer block keeps for its backward, per tensor-parallel rank, term by term, as Megatron
    counts them; ``total`` is their sum.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", section 4 and
    Table 2: per block of a GPT (LayerNorm, unfused attention with dropout, 4h GeLU MLP), 16-bit elements and
    1-byte dropout masks, s tokens x b sequences of width h, a heads, TP degree t: no recomputation
    sbh(10 + 24/t + 5as/(ht)), with sequence parallelism sbh/t (34 + 5as/h); selective recomputation (the
    core attention recomputed) sbh(10 + 24/t), with SP 34sbh/t; full recomputation 2sbh (the block's input; 2sbh/t
    under SP). The terms, in bytes per sbh at ``element`` bytes per value (``e``) and masks of 1 byte:

    - ``norms``: the inputs of the two norms, 2e (1/t under SP);
    - ``replicated``: what the tensor-parallel region's inputs keep whole on every rank (1/t under SP): the QKV
      projection's input e, the MLP's first projection's input e, the two dropout masks after the attention and
      the MLP, 1 each;
    - ``sharded`` (1/t): Q, K (the scores' inputs) and V (the weighted sum's), e x (heads + 2 kv_heads) x
      head_dim / h; the output projection's input, e x heads x head_dim / h; the MLP's activation input and its
      second projection's input, 2e x ffn / h (4h GeLU: 8e; 24 bytes per sbh in all with the attention's, the
      paper's 24/t);
    - ``attention`` (1/t, none without recomputation only): the softmax output e, its dropout mask 1 and the
      dropout output e per a s b s element: 5as/h bytes per sbh. A fused kernel (flash, memory-efficient:
      ``fused_attention``) keeps no s x s tensor; its output is the output projection's input, already counted
      (Megatron's ``compute_activation_memory_without_sp`` counts sbh(10 + 24/t) for the no-recomputation case
      too, for that reason); without attention dropout the softmax output alone is kept, e.

    Adjustments, each a parameter: fp32 training, ``element=4`` (masks stay 1 byte: torch's fused dropout and
    ``parallel.lean_activations``' keep bool masks); no dropout (Llama, ``attention_dropout`` /
    ``hidden_dropout`` False): its masks and outputs are not there.

    Llama-style blocks (Megatron's accounting, ``megatron/training/theoretical_memory_usage.py``,
    ``compute_activation_memory``, Megatron-LM d98e8a6, 2026-08): per layer sbh(18 + 4 ffn/h)/t under SP with
    selective recomputation, the paper's 34 with ``ffn_hidden_size`` for 4h; it has no term for SwiGLU or grouped
    queries (its own TODO: the query projection's width is taken as h). Derived here from the same terms: with
    grouped queries K and V are kv_heads x head_dim wide; with SwiGLU (``gated``) the first projection's output
    is gate|up, 2 ffn wide, which Megatron's own ``SwiGLUFunction`` keeps (``save_for_backward(input)``,
    ``megatron/core/fusions/fused_bias_swiglu.py``), and its ffn-wide product is the second projection's input:
    6e x ffn / h instead of 4e x ffn / h. For a 4h GeLU MLP with a heads of h / a every term is the paper's."""
    ffn = ffn or 4 * hidden
    kv_heads, head_dim = kv_heads or heads, head_dim or hidden // heads
    sbh, t = seq * micro * hidden, tensor
    split = t if sequence_parallel else 1
    if recompute == "full":
        return {"input": element * sbh / split, "total": element * sbh / split}
    masks = 2 if hidden_dropout else 0
    terms = {"norms": 2 * element * sbh / split, "replicated": (2 * element + masks) * sbh / split,
             "sharded": element * seq * micro * ((2 * heads + 2 * kv_heads) * head_dim + (3 if gated else 2) * ffn) / t,
             "attention": 0.0}
    if recompute == "none" and not fused_attention:
        per_score = 2 * element + 1 if attention_dropout else element
        terms["attention"] = per_score * heads * seq * seq * micro / t
    elif recompute not in ("none", "selective"):
        raise ValueError(f"recompute {recompute!r}: none, selective or full")
    terms["total"] = sum(terms.values())
    return terms
