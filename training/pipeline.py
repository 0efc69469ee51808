"""Pipeline-parallel training and eval steps: our schedules driving this rank's chunks inside one
DeepSpeed engine (ZeRO 1-3 over the data-parallel group, unmanaged gradient accumulation so that one
``engine.step()`` reduces and applies the gradients of all micro-batches)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import deepspeed
import torch
import torch.distributed as dist

from modeling.losses import context_share, mean_loss, next_token_targets, token_losses
from modeling.pipeline import defer_weight_grads
from modeling.pipeline_partition import PipelineSettings, RankChunks
from parallel.comm import comm_device
from parallel.context import local_tokens
from parallel.groups import ProcessGroups
from parallel.p2p import PipeComm
from parallel.schedules import ORDERS, SPLIT_BACKWARD, Op, run_schedule
from parallel.weight_grad import WeightGradStore
from training import run_dir
from training.events import Observers
from training.steps import Step, grad_norm

if TYPE_CHECKING:
    from training.config import RunConfig


def pipeline_settings(cfg: RunConfig) -> PipelineSettings:
    """What ``modeling.pipeline_partition.build_chunks`` reads from the run's config."""
    return PipelineSettings(seq_len=cfg.data.seq_len // cfg.parallel.context,  # a context rank's tokens
                            micro_batch_size=cfg.train.micro_batch_size,
                            partition=cfg.parallel.partition, virtual_stages=cfg.parallel.virtual_stages,
                            sequence_parallel=cfg.parallel.sequence_parallel, seed=cfg.train.seed,
                            zero_stage=cfg.parallel.zero_stage, loss_chunk_tokens=cfg.parallel.loss_chunk_tokens)


def write_measured_partition(output_dir: str, built: RankChunks) -> None:
    """``parallel.partition: measured``: on global rank 0, say the partition ``build_chunks`` chose and save it
    with its measured times in ``output_dir/pipeline_partition.json``; nothing for any other partition."""
    seconds = built.seconds
    if seconds is None or dist.get_rank() != 0:
        return
    run_dir.claim(output_dir)
    record = {"partition": built.partition, "seconds": seconds}
    (Path(output_dir) / "pipeline_partition.json").write_text(json.dumps(record, indent=1))
    print(f"parallel.partition=measured: {built.partition} (forward + backward ms: embedding "
          f"{seconds['embed'] * 1e3:.2f}, blocks {', '.join(f'{s * 1e3:.2f}' for s in seconds['blocks'])}, "
          f"head + loss {seconds['head'] * 1e3:.2f}); set parallel.partition to that string to reuse it", flush=True)


class _GradientCarrier(torch.autograd.Function):
    """A scalar (zero, never read) whose gradients with respect to ``weights`` are what ``gradients()`` returns,
    computed in its backward: ``engine.backward`` of it hands gradients made outside autograd to the
    parameters, inside the engine's backward. DeepSpeed multiplies it by the loss scale first; the division by
    ``scale`` cancels that, as the gradients carry it already."""

    @staticmethod
    def forward(ctx, scale, gradients, *weights):
        ctx.scale, ctx.gradients = scale, gradients
        return weights[0].new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        factor = grad_output / ctx.scale  # exactly 1: the loss scale is a power of two (1 without fp16)
        grads = ctx.gradients()
        ctx.gradients = None
        return (None, None, *(g * factor.to(g.dtype) for g in grads))


class PipelineRunner(Step):
    """The pipeline's ``Step``: the schedule's forward, backward (and weight-gradient) ops over this rank's chunks,
    the tied-embedding sync and one engine step."""

    def __init__(self, engine: Any, cfg: RunConfig, groups: ProcessGroups, tied_weight: torch.nn.Parameter | None,
                 hidden_size: int, events: Observers):
        self.engine, self.cfg, self.groups, self.tied_weight = engine, cfg, groups, tied_weight
        self.events = events
        self.p, self.v = groups.pipeline, cfg.parallel.virtual_stages
        # With context and sequence parallelism the hidden state between blocks is this rank's part of the sequence.
        sequence = cfg.data.seq_len // groups.context // (groups.tensor if cfg.parallel.sequence_parallel else 1)
        self.hidden_shape = (cfg.train.micro_batch_size, sequence, hidden_size)
        # the model's load-balancing totals (modeling.experts.SplitRouterLoss) travel after the hidden states
        self.router_loss = engine.module[0].router_loss
        self.shape = ((math.prod(self.hidden_shape) + self.router_loss.size,) if self.router_loss is not None
                      else self.hidden_shape)
        self.dtype = next(engine.module.parameters()).dtype
        self.zero3 = cfg.parallel.zero_stage == 3
        self._tied_grad = None  # this stage's gradient of the tied embedding, summed over the step
        if tied_weight is not None:
            tied_weight.register_hook(self._accumulate_tied)
        self.weight_grads = None  # a split schedule's weight gradients between its B and W ops
        if cfg.parallel.schedule in SPLIT_BACKWARD:
            self.weight_grads = WeightGradStore()
            defer_weight_grads(engine.module, self.weight_grads)

    def _accumulate_tied(self, grad):
        if self._tied_grad is None:
            self._tied_grad = grad.detach().clone()
        else:
            self._tied_grad.add_(grad)
        return grad

    def _loss_scale(self) -> float:
        """fp16's dynamic loss scale, 1.0 in fp32 / bf16 (DeepSpeed multiplies every backward's loss by it).
        A plain float, fixed within a step: reading it costs no device sync."""
        return float(getattr(self.engine.optimizer, "loss_scale", 1.0))

    def _sync_tied_embeddings(self, tied: torch.nn.Parameter, scale: float) -> None:
        """Megatron's embedding all-reduce, done through the engine's backward so that it works whatever ZeRO
        stage holds the gradients: each end adds the other end's contribution. Two embedding-sized buffers,
        no more: at GPT-2's vocabulary each one is a tenth of the model."""
        local = self._tied_grad if self._tied_grad is not None else torch.zeros_like(tied)
        self._tied_grad = None
        others = local.clone()
        dist.all_reduce(others, group=self.groups.embed_group)
        others.sub_(local)
        del local
        with deepspeed.zero.GatheredParameters([tied], enabled=hasattr(tied, "ds_id")):
            self._hand_over([tied], lambda: [others], scale)

    def _hand_over(self, weights: list[torch.nn.Parameter], gradients, scale: float) -> None:
        """Add gradients made outside autograd (``gradients()``, computed in the backward; they carry this
        step's loss scale, like every gradient of the step) to ``weights`` through one ``engine.backward``, so
        DeepSpeed's gradient hooks take them as they take any other."""
        self.engine.backward(_GradientCarrier.apply(scale, gradients, *weights), scale_wrt_gas=False)

    def _backward_step(self, output, grad, chunk: int, microbatch: int) -> None:
        """A B op; a split schedule files the weight gradients' inputs for the W op of (chunk, micro-batch)."""
        store = self.weight_grads
        with store.collecting((chunk, microbatch)) if store is not None else nullcontext():
            if grad is None:  # the loss: DeepSpeed multiplies it by the loss scale
                self.engine.backward(output, scale_wrt_gas=False)
            else:  # the received gradient carries the loss scale already: the surrogate's scaling cancels
                surrogate = (output.float() * grad.float()).sum() / self._loss_scale()
                self.engine.backward(surrogate, scale_wrt_gas=False)

    def _weight_step(self, chunk: int, microbatch: int) -> None:
        """A split schedule's W op: the weight gradients the B op of (chunk, micro-batch) left."""
        assert self.weight_grads is not None  # only split schedules have W ops, and they made the store
        weights, gradients = self.weight_grads.take((chunk, microbatch))
        if weights:
            self._hand_over(weights, gradients, self._loss_scale())

    def _new_pass(self) -> None:
        """ZeRO-3 resets its backward-hook bookkeeping in ``engine.forward``, which our chunks bypass."""
        if self.zero3:
            self.engine.optimizer.clear_backward_seen_flag()

    def _new_step(self) -> None:
        """ZeRO-3 copies the gradients of the step's first backward into its partition buffers and adds the
        later ones; a pipeline's first backward need not reach every parameter of the rank (interleaved: the
        last chunk's comes first), so every step starts from zeroed buffers and adds throughout."""
        if self.zero3:
            self.engine.optimizer.grad_partitions_flat_buffer.zero_()
            self.engine.optimizer.micro_step_id = 1

    def _forward_chunk(self, module: Any, x: Any) -> torch.Tensor:
        """``module``'s forward on ``x`` (token ids, or the previous chunk's message), returning what it sends
        (or its logits): with the load-balancing totals, the message is the hidden states, flat, then them."""
        if self.router_loss is None:
            return module(x)
        size = self.router_loss.size
        if module.spec.embed:
            out = module(x)
        else:
            out = module(x[:-size].view(self.hidden_shape), x[-size:].float())
        if module.spec.head:
            return out
        return torch.cat([out.reshape(-1), module.router_totals.to(out.dtype)])

    def _tokens(self, batch: Any, device: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the input ids this rank embeds, the next-token targets of its tokens) under context parallelism
        (``parallel.context.local_tokens``); (the input ids, None) without it."""
        if batch is None:
            return None, None
        ids = batch["input_ids"].to(device)
        if self.groups.context == 1:
            return ids, None
        local, _, targets = local_tokens(ids, batch.get("labels", batch["input_ids"]).to(device), self.groups.cp_group)
        return local, targets

    def _head_losses(self, module: Any, x: Any, labels: torch.Tensor,
                     shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The last chunk's forward on ``x`` and the per-token NLL of its targets (the next ids of ``labels`` with
        ``shift``, else ``labels`` themselves: context targets): (losses, targets)."""
        targets = next_token_targets(labels) if shift else labels
        losses, _ = token_losses(module.model, lambda: self._forward_chunk(module, x), targets,
                                 self.cfg.parallel.loss_chunk_tokens)
        return losses, targets

    def _comm(self) -> PipeComm:
        return PipeComm(self.groups.pp_ranks, self.groups.pp_rank, self.shape, self.dtype,
                        comm_device(self.groups.pp_group), timeout_s=self.cfg.parallel.p2p_timeout_s)

    def train(self, batches: Any, step: int) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches: (the mean loss, the gradient norm), on every
        rank."""
        m, device, chunks = self.cfg.train.grad_accum, self.engine.device, self.engine.module
        losses = []

        def forward_step(chunk: int, microbatch: int, x: torch.Tensor | None) -> torch.Tensor:
            self._new_pass()
            module = chunks[chunk]
            batch: Any = batches.batch(step, microbatch) if (module.spec.embed or module.spec.head) else None
            ids, targets = self._tokens(batch, device)
            x = ids if module.spec.embed else x
            if not module.spec.head:
                return self._forward_chunk(module, x)
            labels = batch["labels"].to(device) if targets is None else targets
            nll, targets = self._head_losses(module, x, labels, shift=self.groups.context == 1)
            if self.groups.context > 1:  # this context rank's share of the mean
                loss = context_share(nll, targets, self.groups.context)
            else:
                loss = mean_loss(nll, targets)
            if self.router_loss is not None:
                sequence_group = self.groups.tp_group if self.cfg.parallel.sequence_parallel else None
                loss = loss + self.router_loss.loss(module.router_totals, targets.numel(), sequence_group)
            losses.append(loss.detach())  # stays on the device: no host wait per micro-batch
            return loss / m  # the gradient of the mean over micro-batches

        ops = ORDERS[self.cfg.parallel.schedule](self.p, m, self.groups.pp_rank, self.v)
        self._tied_grad = None
        self._new_step()
        run_schedule(ops, p=self.p, v=self.v, rank=self.groups.pp_rank, comm=self._comm(),
                     forward_step=forward_step, backward_step=self._backward_step, weight_step=self._weight_step)
        if self.tied_weight is not None:
            self._new_pass()
            self._sync_tied_embeddings(self.tied_weight, self._loss_scale())
        with self.events.phase("optimizer", step + 1):
            self.engine.step()
        return self._mean_over_pipeline(losses), grad_norm(self.engine, self.groups)

    def _mean_over_pipeline(self, losses: list[torch.Tensor]) -> float:
        """The mean of the last stages' micro-batch losses, on every rank; read on the host once."""
        values = torch.zeros(2, dtype=torch.float64, device=comm_device(self.groups.pp_group))
        if losses:
            values[0] = torch.stack(losses).double().sum().to(values.device)
            values[1] = len(losses)
        dist.all_reduce(values, group=self.groups.dp_group)
        dist.all_reduce(values, group=self.groups.pp_group)  # only the last stage contributes
        return float(values[0] / values[1])

    @torch.no_grad()
    def eval_sums(self, eval_batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]
                  ) -> tuple[torch.Tensor | float, float]:
        """Forward-only pipeline over ``eval_batches`` [(batch, weight)]: summed NLL and token count of
        this data-parallel rank (reduced over the pipeline)."""
        batches = list(eval_batches)
        m, device, chunks = len(batches), self.engine.device, self.engine.module
        sums = torch.zeros(2, dtype=torch.float64, device=comm_device(self.groups.pp_group))

        def forward_step(chunk: int, microbatch: int, x):
            module = chunks[chunk]
            batch, weight = batches[microbatch]
            ids, targets = self._tokens(batch, device)
            x = ids if module.spec.embed else x
            if not module.spec.head:
                return self._forward_chunk(module, x)
            shift = targets is None  # context targets: rank 0's last token has none
            nll, _ = self._head_losses(module, x, cast(torch.Tensor, ids if shift else targets), shift)
            count = nll.shape[1] - 1 if shift else nll.shape[1] - (self.groups.cp_rank == 0)
            sums[0] += (nll.sum(dim=1).double() * weight.to(nll.device)).sum().to(sums.device)
            sums[1] += float(weight.sum()) * count  # weight is the data's, on the host
            return nll

        ops = [Op("F", c, k) for c in range(self.v) for k in range(m)]
        run_schedule(ops, p=self.p, v=self.v, rank=self.groups.pp_rank, comm=self._comm(),
                     forward_step=forward_step, backward_step=None, forward_only=True)
        dist.all_reduce(sums, group=self.groups.pp_group)
        total_nll, total_tokens = sums.tolist()
        return total_nll, total_tokens
