"""Point-to-point communication between pipeline stages.

``PipeComm`` is bound to this rank's pipeline group. Activation shapes are fixed per run and given up
front, so a receive needs no metadata round trip. Sends are non-blocking (completed at ``flush``);
receives block, with a timeout, so a failed peer becomes an error instead of a hang. Every message has a
tag derived from (model chunk, micro-batch, direction): a receive can never pick up the wrong tensor.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


class PipelineTimeout(RuntimeError):
    pass


class PipeComm:
    def __init__(self, pp_ranks: list[int], pp_rank: int, num_microbatches: int, shape: tuple[int, ...],
                 dtype: torch.dtype, device, group=None, timeout_s: float = 600.0):
        self.pp_ranks, self.pp_rank, self.p = pp_ranks, pp_rank, len(pp_ranks)
        self.m, self.shape, self.dtype, self.device, self.group = num_microbatches, shape, dtype, device, group
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._pending = []
        self.bytes_sent = 0

    def _tag(self, boundary: int, microbatch: int, backward: bool) -> int:
        """``boundary`` g is the edge between model chunks g and g + 1."""
        return 2 * (boundary * self.m + microbatch) + int(backward)

    def _peer(self, offset: int) -> int:
        return self.pp_ranks[(self.pp_rank + offset) % self.p]

    def _recv(self, src: int, tag: int, what: str) -> torch.Tensor:
        buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        work = dist.irecv(buffer, src=src, tag=tag, group=None)
        try:
            work.wait(self.timeout)
        except RuntimeError as exc:
            raise PipelineTimeout(f"pipeline rank {self.pp_rank}: no {what} from global rank {src} within "
                                  f"{self.timeout.total_seconds():.0f}s; another rank has probably failed "
                                  f"({exc})") from None
        return buffer

    def _send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        tensor = tensor.detach().contiguous()
        if tuple(tensor.shape) != tuple(self.shape):
            raise ValueError(f"pipeline message of shape {tuple(tensor.shape)}, expected {self.shape}")
        self._pending.append((dist.isend(tensor, dst=dst, tag=tag), tensor))
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def send_forward(self, activation: torch.Tensor, chunk: int, microbatch: int) -> None:
        """Send this rank's output of global model chunk ``chunk`` to the next chunk's rank."""
        self._send(activation, self._peer(+1), self._tag(chunk, microbatch, False))

    def recv_forward(self, chunk: int, microbatch: int) -> torch.Tensor:
        """Receive the input of global model chunk ``chunk`` from the previous chunk's rank."""
        return self._recv(self._peer(-1), self._tag(chunk - 1, microbatch, False), "activation")

    def send_backward(self, grad: torch.Tensor, chunk: int, microbatch: int) -> None:
        """Send the gradient of global chunk ``chunk``'s input back to the previous chunk's rank."""
        self._send(grad, self._peer(-1), self._tag(chunk - 1, microbatch, True))

    def recv_backward(self, chunk: int, microbatch: int) -> torch.Tensor:
        """Receive the gradient of global chunk ``chunk``'s output from the next chunk's rank."""
        return self._recv(self._peer(+1), self._tag(chunk, microbatch, True), "gradient")

    def send_forward_recv_backward(self, activation: torch.Tensor, chunk: int, microbatch: int) -> torch.Tensor:
        """1F1B steady state: pass the activation on and wait for the gradient of the same micro-batch."""
        self.send_forward(activation, chunk, microbatch)
        return self.recv_backward(chunk, microbatch)

    def send_backward_recv_forward(self, grad: torch.Tensor, chunk: int, microbatch: int,
                                   next_microbatch: int) -> torch.Tensor:
        """1F1B steady state on the receiving side: return a gradient, wait for the next activation."""
        self.send_backward(grad, chunk, microbatch)
        return self.recv_forward(chunk, next_microbatch)

    def flush(self) -> None:
        """Wait until every send of this step has completed."""
        for work, _ in self._pending:
            work.wait(self.timeout)
        self._pending.clear()
