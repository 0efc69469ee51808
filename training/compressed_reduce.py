"""``parallel.grad_compression``: the data-parallel gradient reduction of a DeepSpeed engine done by
``parallel.compression`` (bf16, int8 or int4 on the wire, error feedback) instead of DeepSpeed's full-precision
all-reduce. Model-parallel reductions (tensor parallel, sequence parallel, the tied embedding) are untouched.

Where DeepSpeed's reduction is replaced:
- ZeRO-0: the engine's backward all-reduce is switched off (``enable_backward_allreduce``, as DeepSpeed's own
  1-bit optimizers do) and ``before_step`` averages the accumulated gradients, in buckets, before the optimizer
  step and the gradient norm.
- ZeRO-1/2: the ZeRO optimizer's ``average_tensor`` (each gradient bucket as it is reduced: at the accumulation
  boundary for ZeRO-1, at every backward for ZeRO-2) becomes a compressed mean of the bucket, after which DeepSpeed
  copies this rank's partition out of it as after its own ``reduce_scatter=false`` all-reduce.
The residuals are kept per parameter (``residuals``, fp32, one gradient's size per rank) and saved in the
rank's checkpoint file (``training.checkpoint``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from parallel.compression import Codec, Scratch, compressed_mean_, compressed_scatter_mean_

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from parallel.groups import ProcessGroups
    from training.config_schema import ParallelConfig

DEFAULT_BUCKET = 25_000_000  # ZeRO-0 bucket when neither parallel.bucket_size nor a hidden size gives one


class GradientCompression:
    """The compressed reduction of one engine's data-parallel gradients, over ``group`` (its ZeRO group)."""

    def __init__(self, codec: str, group: dist.ProcessGroup | None, error_feedback: bool, bucket_elements: int):
        self.codec, self.group = Codec(codec), group
        self.error_feedback, self.bucket_elements = error_feedback, bucket_elements
        self.residuals: dict[int, torch.Tensor] = {}  # id(parameter) -> its residual, flat fp32
        self.names: dict[int, str] = {}
        self.zero_stage = 0

    def attach(self, engine: DeepSpeedEngine) -> None:
        """Take over ``engine``'s data-parallel gradient reduction."""
        self.names = {id(p): name for name, p in engine.module.named_parameters()}
        self.zero_stage = engine.zero_optimization_stage()
        if self.zero_stage == 0:
            engine.enable_backward_allreduce = False
            return
        optimizer = engine.optimizer

        def average_tensor(tensor: torch.Tensor, communication_data_type: torch.dtype) -> None:
            bucket = optimizer.ipg_buckets[communication_data_type]
            params = [optimizer.bit16_groups[group][index] for group, index, _ in bucket.params]
            if not params:  # an empty bucket at the epilogue: the same on every rank
                return
            self.mean_(tensor, params, owned_ranges(optimizer, bucket.params, dist.get_world_size(self.group)))
            optimizer._add_full_reduction_to_compact_grad_partition(tensor, communication_data_type)

        optimizer.average_tensor = average_tensor

    def before_step(self, engine: DeepSpeedEngine) -> None:
        """ZeRO-0: average the gradients of the step (accumulated in ``param.grad``) over the group, in
        buckets of ``bucket_elements``; nothing at ZeRO 1/2, whose optimizer reduces them itself."""
        if self.zero_stage != 0:
            return
        scratch = Scratch()  # the buckets' buffers, reused one bucket after another and dropped after the step
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for param in engine.module.parameters():
            if not param.requires_grad:
                continue
            if param.grad is None:  # unused on this rank: the buckets must be the same on every rank
                param.grad = torch.zeros_like(param)
            bucket.append(param)
            size += param.numel()
            if size >= self.bucket_elements:
                self._mean_of_grads(bucket, scratch)
                bucket, size = [], 0
        if bucket:
            self._mean_of_grads(bucket, scratch)

    def _mean_of_grads(self, params: list[torch.nn.Parameter], scratch: Scratch) -> None:
        grads = [p.grad for p in params if p.grad is not None]  # all of them: before_step gives each one
        flat = scratch.take("grads", (sum(g.numel() for g in grads),), grads[0].dtype, grads[0].device)
        torch.cat([g.reshape(-1) for g in grads], out=flat)
        self.mean_(flat, params, scratch=scratch)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def mean_(self, flat: torch.Tensor, params: list[torch.nn.Parameter],
              owned: list[list[tuple[int, int]]] | None = None, scratch: Scratch | None = None) -> None:
        """``flat`` (the gradients of ``params``, concatenated) replaced by their compressed mean; with ``owned``
        (each rank's ranges of ``flat``: ZeRO's partitions) only each rank's own ranges."""
        if dist.get_world_size(self.group) == 1:
            return
        residual = None
        if self.error_feedback:
            residual = _joined([self._residual(p) for p in params])
        if owned is None:
            compressed_mean_(flat.view(-1), self.group, self.codec, residual, scratch)
        else:
            compressed_scatter_mean_(flat, owned, self.group, self.codec, residual)
        if residual is not None:
            offset = 0
            for param in params:
                self.residuals[id(param)] = residual[offset:offset + param.numel()]
                offset += param.numel()

    def _residual(self, param: torch.nn.Parameter) -> torch.Tensor:
        found = self.residuals.get(id(param))
        if found is None:
            found = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        return found

    def state(self) -> dict[str, torch.Tensor]:
        """This rank's residuals by parameter name, for its checkpoint file."""
        return {f"residual/{self.names[key]}": value for key, value in self.residuals.items()}

    def load_state(self, saved: dict[str, torch.Tensor], engine: Any) -> None:
        """The residuals ``state`` returned, saved by this rank at the same layout."""
        by_name = {name: p for name, p in engine.module.named_parameters()}
        for key, value in saved.items():
            param = by_name[key.removeprefix("residual/")]
            self.residuals[id(param)] = value.to(param.device, torch.float32).reshape(-1).clone()


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 1-D ``tensors`` one after another: the tensor they are consecutive views of when they tile one (the
    residuals of a bucket after its first step), else a new one."""
    base = tensors[0]._base
    if base is None or base.dim() != 1:
        return torch.cat(tensors)
    end = base.data_ptr()
    for tensor in tensors:
        if tensor._base is not base or tensor.data_ptr() != end:
            return torch.cat(tensors)
        end += tensor.numel() * tensor.element_size()
    return base if end == base.data_ptr() + base.numel() * base.element_size() else torch.cat(tensors)


def owned_ranges(optimizer: Any, bucket_params: list[tuple[int, int, int]], ranks: int) -> list[list[tuple[int, int]]]:
    """For a ZeRO-1/2 gradient bucket (``bucket_params``: its parameters as (group, index, id), their gradients
    one after another): the (offset, length) ranges each data-parallel rank's partition holds, from DeepSpeed's
    own partition maps (a parameter may straddle partitions)."""
    owned: list[list[tuple[int, int]]] = [[] for _ in range(ranks)]
    base = 0
    for group, index, param_id in bucket_params:
        numel = optimizer.bit16_groups[group][index].numel()
        starts = sorted((int(optimizer.grad_start_offset[group][owner][param_id]), owner)
                        for owner in optimizer.param_to_partition_ids[group][param_id])
        for k, (start, owner) in enumerate(starts):
            end = starts[k + 1][0] if k + 1 < len(starts) else numel
            ranges = owned[owner]
            if ranges and sum(ranges[-1]) == base + start:  # continues the owner's last range
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + end - start)
            else:
                ranges.append((base + start, end - start))
        base += numel
    return owned


def attach(par: ParallelConfig, engine: DeepSpeedEngine, groups: ProcessGroups,
           hidden_size: int | None) -> GradientCompression | None:
    """``par.grad_compression`` over ``engine``'s data-parallel group, attached to it (also as
    ``engine.gradient_compression``, read by the step and the checkpoint); None when it is "none"."""
    engine.gradient_compression = None
    if par.grad_compression == "none" or par.sync_every > 1:  # with sync_every the codec carries the deltas
        return None
    bucket = par.bucket_size or (hidden_size**2 if hidden_size else DEFAULT_BUCKET)
    compression = GradientCompression(par.grad_compression, groups.dp_group, par.error_feedback, bucket)
    compression.attach(engine)
    engine.gradient_compression = compression
    return compression
