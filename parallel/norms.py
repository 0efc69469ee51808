"""A norm over a width split across the tensor group (after a column-parallel layer whose full output the
norm spans, e.g. OLMo 2's q/k norms over all heads): each rank holds its slice of the weight and normalises its
slice of the activations by the statistic of the full width (the sum of squares, summed over the group)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from parallel.comm import sum_over_tensor_parallel_region
from parallel.layers import mark_sharded, shard_rows


class ShardedRMSNorm(nn.Module):
    """y_i = w_i * x_i / sqrt(mean_j(x_j^2) + eps), the mean over the full width (``full_width``), x_i and w_i
    this rank's slice. Computed in fp32 and cast back, as transformers' RMSNorm does."""

    def __init__(self, weight: torch.Tensor, eps: float, full_width: int, group: ProcessGroup | None):
        super().__init__()
        self.group, self.eps, self.full_width = group, eps, full_width
        self.weight = nn.Parameter(weight)
        mark_sharded(self.weight, 0, full_width)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, eps: float, group: ProcessGroup | None) -> "ShardedRMSNorm":
        return cls(shard_rows(weight, group), eps, weight.shape[0], group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        squares = sum_over_tensor_parallel_region(x.pow(2).sum(-1, keepdim=True), self.group)
        x = x * torch.rsqrt(squares / self.full_width + self.eps)
        return self.weight * x.to(dtype)
