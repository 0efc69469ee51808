"""Point-to-point communication between pipeline stages, as NCCL allows it.

``PipeComm`` is bound to this rank's pipeline group. Activation shapes are fixed per run and given up
front, so a receive needs no metadata round trip. Messages carry no tags (NCCL has none): between two ranks,
sends and receives are matched in the order they are posted, and every schedule posts them in the order of
its operations on both sides (``parallel.schedules.message_order`` checks that each schedule keeps the two
sides' orders equal). After each operation a rank posts, in one ``batch_isend_irecv``, the send of what it
produced and the receive of what its next operation needs: neighbours that send to each other at once (the
1F1B steady state) then do so in one batched call each, which NCCL needs to avoid a deadlock, and the next
input is on its way before this rank asks for it. Sends complete at ``flush``; a receive waits at most
``timeout_s``, so a failed peer becomes an error instead of a hang.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


class PipelineTimeout(RuntimeError):
    pass


def wait_for(work: dist.Work, timeout: datetime.timedelta, pp_rank: int, peer: int, what: str) -> None:
    """Wait for a receive; a peer that sends nothing within ``timeout`` is an error naming it."""
    try:
        work.wait(timeout)
    except RuntimeError as exc:
        raise PipelineTimeout(f"pipeline rank {pp_rank}: no {what} from global rank {peer} within "
                              f"{timeout.total_seconds():.0f}s; another rank has probably failed ({exc})") from None


class PipeComm:
    def __init__(self, pp_ranks: list[int], pp_rank: int, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, timeout_s: float = 600.0):
        """``device``: where the pipeline group communicates (``parallel.comm.comm_device``)."""
        self.pp_ranks, self.pp_rank, self.p = pp_ranks, pp_rank, len(pp_ranks)
        self.shape, self.dtype, self.device = shape, dtype, device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []
        self._posted: tuple[dist.Work, torch.Tensor, int] | None = None

    def peer(self, offset: int) -> int:
        """Global rank of the stage ``offset`` away (+1 next, -1 previous, cyclic for interleaved chunks)."""
        return self.pp_ranks[(self.pp_rank + offset) % self.p]

    def exchange(self, send: torch.Tensor | None = None, send_to: int = 0, recv_from: int = 0) -> None:
        """One batched post: ``send`` to the stage ``send_to`` away, and a receive from the stage ``recv_from``
        away (0: none), which ``receive`` then waits for."""
        assert self._posted is None, "the previous receive was not taken"
        ops = []
        if send is not None:
            send = send.detach().contiguous()
            if tuple(send.shape) != tuple(self.shape):
                raise ValueError(f"pipeline message of shape {tuple(send.shape)}, expected {self.shape}")
            ops.append(dist.P2POp(dist.isend, send, self.peer(send_to)))
        if recv_from:
            buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, buffer, self.peer(recv_from)))
        works = dist.batch_isend_irecv(ops) if ops else []
        if send is not None:
            self._sends.append((works[0], send))
        if recv_from:
            self._posted = (works[-1], buffer, recv_from)

    def receive(self) -> torch.Tensor:
        """The message of the receive posted last, once it has arrived."""
        if self._posted is None:
            raise RuntimeError("receive() without a receive posted by exchange()")
        work, buffer, offset = self._posted
        self._posted = None
        wait_for(work, self.timeout, self.pp_rank, self.peer(offset), "activation" if offset < 0 else "gradient")
        return buffer

    def flush(self) -> None:
        """Wait until every send of this step has completed."""
        for work, _ in self._sends:
            work.wait(self.timeout)
        self._sends.clear()


class StageLink:
    """Messages between pipeline stages at decoding, whose shapes change from one to the next (rows finish,
    prompts differ): the receiver knows each shape from what came before it, so none carries metadata.
    Sends are asynchronous (their tensors are kept until they complete); a receive waits at most
    ``timeout_s``."""

    def __init__(self, pp_ranks: list[int], pp_rank: int, device: torch.device, timeout_s: float = 600.0):
        self.pp_ranks, self.pp_rank, self.p, self.device = pp_ranks, pp_rank, len(pp_ranks), device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []

    def peer(self, offset: int) -> int:
        return self.pp_ranks[(self.pp_rank + offset) % self.p]

    def send(self, tensor: torch.Tensor, offset: int) -> None:
        """Send ``tensor`` to the stage ``offset`` away (cyclic: the last stage's +1 is the first)."""
        tensor = tensor.detach().to(self.device).contiguous()
        self._sends = [(work, kept) for work, kept in self._sends if not work.is_completed()]
        work = dist.isend(tensor, self.peer(offset))
        assert work is not None
        self._sends.append((work, tensor))

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, offset: int) -> torch.Tensor:
        """The next message from the stage ``offset`` away (-1: the previous one)."""
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        work = dist.irecv(buffer, self.peer(offset))
        assert work is not None
        wait_for(work, self.timeout, self.pp_rank, self.peer(offset), "message")
        return buffer

    def flush(self) -> None:
        for work, _ in self._sends:
            work.wait(self.timeout)
        self._sends.clear()
