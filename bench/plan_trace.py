"""``bench plan``'s activations by tracing: one micro-batch of a model chunk forward and backward on the meta
device, every tensor an operation makes counted until it is freed (``LiveBytes``), attention as the target
device would run it; and the run's whole model on the meta device (``full_meta_model``) under a fake process
group (``fake_world``) of the layout's size."""

from __future__ import annotations

import weakref
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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


def _additive(mask, dtype):
    """What torch's attention makes of a boolean mask before its fused kernels, which keep it for the backward
    (a sliding window's, a padded batch's): an additive mask of the query's dtype, 0 where attended, -inf
    elsewhere."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask.logical_not(), float("-inf"))


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
            attn_mask = _additive(attn_mask, query.dtype)
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
                query, key, value, dropout_p, is_causal, attn_mask=_additive(attn_mask, query.dtype), scale=scale)[0]
        return original(query, key, value, *args, scale=scale, enable_gqa=enable_gqa)

    return attention


def dropout_as_on(device: str):
    """``F.dropout`` for meta tensors as ``device`` runs it: CUDA's fused kernel (``native_dropout``) keeps a
    boolean mask, the CPU path a mask of the input's dtype (meta tensors alone take the CPU path)."""
    import torch.nn.functional as F

    original = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if device == "cuda" and input.device.type == "meta" and training and 0 < p < 1 and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return original(input, p, training, inplace)

    return dropout


def experts_as_grouped(self, hidden_states, top_k_index, top_k_weights):
    """A transformers experts module's forward for meta tensors, making the tensors its grouped kernels make
    (``grouped_mm_experts_forward``) for its tokens x top-k rows: gathered inputs, the gate|up output, the
    activation, the down output and its weighted copy. (The kernels themselves have no meta implementation in
    fp32, and the eager loop's ``nonzero`` needs values.)"""
    top_k = top_k_index.shape[-1]
    rows = hidden_states.repeat_interleave(top_k, dim=0)
    first = self.gate_up_proj[0] if self.has_gate else self.up_proj[0]
    up = rows @ (first if self.is_transposed else first.t())
    up = self._apply_gate(up) if self.has_gate else self.act_fn(up)
    down = up @ (self.down_proj[0] if self.is_transposed else self.down_proj[0].t())
    weighted = down * top_k_weights.reshape(-1, 1).to(down.dtype)
    return weighted.view(-1, top_k, weighted.shape[-1]).sum(dim=1)


@dataclass
class ChunkTrace:
    """One micro-batch through one model chunk: bytes kept from its forward to its backward (with its output),
    and the most the forward and the backward add above what was alive when they began."""

    kept: int
    forward_peak: int
    backward_peak: int  # gradients already allocated, accumulated in place
    fresh_backward_peak: int = 0  # gradients made by this backward, kept to its end


def _batch(cfg, device="meta") -> dict:
    """One micro-batch of token ids (their values do not matter to memory)."""
    b, s = cfg.train.micro_batch_size, cfg.data.seq_len
    ids = torch.zeros(b, s, dtype=torch.long, device=device)
    if cfg.data.source_field:
        target = torch.zeros(b, cfg.data.max_target_len, dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": target}
    return {"input_ids": ids, "labels": ids}


class _Bare:
    """What ``training.tasks.seq2seq.Seq2Seq.loss`` calls a model engine: the module itself."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _forward(module, cfg, groups, spec):
    """(output, loss or None) of one micro-batch as the training step computes it (the output layer and loss in
    chunks of ``parallel.loss_chunk_tokens`` tokens, as ``modeling.losses.token_losses`` runs them)."""
    from modeling.losses import context_share, mean_loss, next_token_targets, token_losses
    from parallel.context import local_tokens
    from training.tasks.seq2seq import Seq2Seq

    batch, chunk = _batch(cfg), cfg.parallel.loss_chunk_tokens
    if spec is None and cfg.data.source_field:  # the whole model, no pipeline
        return None, Seq2Seq(cfg).loss(_Bare(module), batch, groups)
    ids, positions = batch["input_ids"], None
    targets = next_token_targets(batch["labels"])
    if groups.context > 1:  # this context rank's tokens and targets, attention across the (fake) context group
        ids, positions, targets = local_tokens(batch["input_ids"], batch["labels"], groups.cp_group)
    if spec is None:
        forward = lambda: module(input_ids=ids, position_ids=positions, use_cache=False)  # noqa: E731
    else:
        hidden = ids if spec.embed else _received(module, cfg, groups)
        if not spec.head:
            return module(hidden), None
        chunk_module = module
        forward, module = (lambda: chunk_module(hidden)), module.model
    losses, out = token_losses(module, forward, targets, chunk)
    loss = context_share(losses, targets, groups.context) if groups.context > 1 else mean_loss(losses, targets)
    return out if isinstance(out, torch.Tensor) else out.logits, loss


def _received(chunk, cfg, groups) -> torch.Tensor:
    """The hidden states a chunk that does not embed receives from the previous stage, as
    ``training.pipeline`` sends them: (micro-batch, sequence (1/context of it under context parallelism, 1/TP
    of that under sequence parallelism), the chunk's hidden size), in the chunk's dtype."""
    sequence = cfg.data.seq_len // groups.context // (groups.tensor if cfg.parallel.sequence_parallel else 1)
    dtype = next((p.dtype for p in chunk.parameters() if p.is_floating_point()), torch.float32)
    return torch.zeros(cfg.train.micro_batch_size, sequence, chunk.hidden_size, dtype=dtype, device="meta")


def meta_patches(device: str) -> ExitStack:
    """What a meta-device trace patches (entered together): transformers looks at values that meta tensors do
    not have: the position ids, for packed sequences (the training blocks' positions are 0..seq_len-1, never
    packed), and the padding masks, to skip a mask when nothing is padded: decoders never are here (packed
    blocks; a seq2seq decoder's mask is the model's own ones), an encoder's sources are (the mask is built, as
    for a batch of sources of several lengths); and the token ids, to warn about padding. Attention and dropout
    run as on ``device``, experts as their grouped kernels."""
    from unittest import mock

    from transformers import PreTrainedModel, masking_utils
    from transformers.integrations.moe import ExpertsInterface

    causal_skip = masking_utils._ignore_causal_mask_sdpa
    stack = ExitStack()
    for patch in (mock.patch.object(masking_utils, "find_packed_sequence_indices", return_value=None),
                  mock.patch.object(PreTrainedModel, "warn_if_padding_and_no_attention_mask", lambda *args: None),
                  mock.patch.object(masking_utils, "_ignore_causal_mask_sdpa",
                                    lambda padding_mask, *args, **kwargs: causal_skip(None, *args, **kwargs)),
                  mock.patch.object(masking_utils, "_ignore_bidirectional_mask_sdpa", return_value=False),
                  mock.patch("torch.nn.functional.scaled_dot_product_attention", attention_as_on(device)),
                  mock.patch("torch.nn.functional.dropout", dropout_as_on(device)),
                  mock.patch.object(ExpertsInterface, "get_interface", lambda *args: experts_as_grouped)):
        stack.enter_context(patch)
    return stack


def _traced_pass(module, cfg, groups, spec, device: str) -> tuple[int, int, int]:
    """(bytes kept from the forward, the forward's peak, the backward's peak) of one micro-batch, each above
    what was alive when it began."""
    live = LiveBytes()
    with meta_patches(device), live:
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


def fake_world(world: int, rank: int) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    # meta too: point-to-point calls (ring attention's batch_isend_irecv) look up the tensors' device's backend
    dist.init_process_group("cpu:fake,cuda:fake,meta:fake", store=FakeStore(), rank=rank, world_size=world)


def full_meta_model(cfg):
    """The whole model of ``cfg`` on the meta device, as the run builds it (a BPE tokenizer at its configured
    size; its special tokens are the byte-level tokenizer's)."""
    from modeling.build import auto_class, byte_level_tokenizer, load_tokenizer
    from modeling.materialize import empty_model
    from training.assembly import run_model_config

    choice = cfg.model.tokenizer or (cfg.model.pretrained if cfg.model.pretrained else "byte")
    directory = choice not in ("byte", "bpe")
    tokenizer = load_tokenizer(choice, cfg.model.trust_remote_code) if directory else byte_level_tokenizer()
    hf = run_model_config(cfg, tokenizer, cfg.model.bpe_vocab_size if choice == "bpe" else None)
    model = empty_model(auto_class(hf), hf, cfg.model.trust_remote_code)
    return model if cfg.precision == "fp32" else model.to(getattr(torch, {"bf16": "bfloat16"}.get(cfg.precision,
                                                                                               "float16")))

