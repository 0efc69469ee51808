"""Decoding through a pipeline of stages: batches of requests flow through the stages in turn, so with at least
as many batches in flight as stages every stage works on some batch at every step (the steady state of a decode
pipeline), and a finished batch's slot takes the next queued one.

Per batch and step, stage s receives the tokens chosen at the previous step (the first stage from the last,
the others from the stage before, which forwards them on first) and applies them: rows that met a stop token
or the token budget leave the batch and the cache. It then receives the running rows' hidden states (the first
stage embeds their last token), runs its layers and sends the result on; the last stage picks each row's token
from its vocabulary shard (``parallel.sampling.choose``) and sends them to the first. A prefill is the same
with the whole prompt and no tokens message. Every rank holds every batch's token ids (a few integers per
row), so all stages know each message's shape and when a batch ends. The stage itself (a model's part and its
KV cache) comes from ``modeling.decoding``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from parallel.p2p import StageLink
from parallel.sampling import Decoding, VocabShard, choose


@dataclass
class Batch:
    """Requests decoded together. ``ids``/``mask``: [B, T] (prompt, left-padded, then the chosen tokens; a
    finished row's later entries are padding); ``rows``: the rows still decoding, in the cache's order."""

    requests: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    padded: bool
    rows: list[int] = field(default_factory=list)
    generated: int = 0
    cache: Any = None
    encoder: Any = None               # (encoder hidden states, attention mask) of the rows, seq2seq only
    timestamps: list[float] = field(default_factory=list)
    prompt_width: int = 0             # where the chosen tokens begin in ``ids``
    pending: Any = None               # one stage: the tokens chosen last, for the next step

    @classmethod
    def from_prompts(cls, requests: list[int], prompts: list[list[int]], pad: int, device: torch.device,
               left: bool = True) -> Batch:
        """The prompts padded to one width: on the left for a decoder (new tokens follow every row's last),
        on the right for an encoder's input."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            where = slice(width - len(prompt), width) if left else slice(0, len(prompt))
            ids[row, where] = torch.tensor(prompt, dtype=torch.long)
            mask[row, where] = 1
        padded = any(len(p) < width for p in prompts)
        return cls(torch.tensor(requests, device=device), ids.to(device), mask.to(device), padded,
                   rows=list(range(len(prompts))), prompt_width=width)

    def positions(self, new: int) -> torch.Tensor:
        """Position ids of the last ``new`` tokens of the running rows (HF: cumulative sum of the mask - 1)."""
        mask = self.mask[self.rows]
        return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -new:]

    def model_mask(self) -> torch.Tensor | None:
        return self.mask[self.rows] if self.padded else None

    def history(self) -> torch.Tensor:
        """The running rows' tokens so far, -1 for padding (what a repetition penalty sees)."""
        return self.ids[self.rows].masked_fill(self.mask[self.rows] == 0, -1)

    def append(self, tokens: torch.Tensor) -> None:
        """Add one step's tokens ([B], -1 for rows not running) to ``ids`` and ``mask``."""
        running = tokens >= 0
        self.ids = torch.cat([self.ids, tokens.clamp(min=0).unsqueeze(-1)], dim=-1)
        self.mask = torch.cat([self.mask, running.long().unsqueeze(-1)], dim=-1)
        self.generated += 1

    def keep(self, rows: list[int]) -> None:
        """Only ``rows`` go on: the others leave the cache (and the encoder output)."""
        if rows == self.rows:
            return
        index = torch.tensor([self.rows.index(r) for r in rows], device=self.ids.device)
        if self.cache is not None and rows:
            self.cache.batch_select_indices(index)
        if self.encoder is not None and rows:
            hidden, mask = self.encoder
            self.encoder = (hidden.index_select(0, index), mask.index_select(0, index))
        self.rows = rows




class Stage(Protocol):
    pads_left: bool
    embeds: bool
    has_head: bool
    hidden_size: int

    def begin(self, batch: Batch) -> None: ...
    def prefill_input(self, batch: Batch) -> torch.Tensor: ...
    def step_input(self, batch: Batch) -> torch.Tensor: ...
    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor: ...
    def cache_bytes(self, batch: Batch) -> int: ...


@dataclass(frozen=True)
class Limits:
    """When a row stops: a stop token, or ``max_new_tokens``; ``forced_eos`` is then the last token (as
    Hugging Face's ``forced_eos_token_id``)."""

    max_new_tokens: int
    stop_tokens: frozenset[int] = frozenset()
    forced_eos: int | None = None


@dataclass
class Output:
    """A finished request: its new tokens and when (seconds from the start) its first and last came."""

    request: int
    tokens: list[int]
    first_token_s: float
    last_token_s: float


class DecodeSchedule:
    """This rank's side of the decode pipeline; ``link`` is None at pipeline=1."""

    def __init__(self, stage: Stage, link: StageLink | None, shard: VocabShard, decoding: Decoding,
                 limits: Limits, dtype: torch.dtype):
        self.stage, self.link, self.shard = stage, link, shard
        self.decoding, self.limits, self.dtype = decoding, limits, dtype
        self.first, self.last = stage.embeds, stage.has_head
        self.outputs: list[Output] = []
        self.start = 0.0
        self.peak_cache_bytes = 0                 # the most the caches of the batches in flight held at once
        self._cache_bytes: dict[int, int] = {}

    def run(self, batches: list[Batch], slots: int) -> list[Output]:
        """Decode every batch, ``slots`` of them in flight; the finished requests (on the last stage)."""
        self.start = time.perf_counter()
        queue = deque(batches)
        flying = [queue.popleft() for _ in range(min(slots, len(queue)))]
        for batch in flying:
            self._prefill(batch)
        while flying:
            flying = [b for b in (self._step(batch, queue) for batch in flying) if b is not None]
        if self.link is not None:
            self.link.flush()
        return self.outputs

    def _prefill(self, batch: Batch) -> None:
        self.stage.begin(batch)
        if self.first:
            x = self.stage.prefill_input(batch)
        else:
            x = self._receive_hidden(len(batch.rows), batch.ids.shape[1])
        self._forward(x, batch)

    def _step(self, batch: Batch, queue: deque[Batch]) -> Batch | None:
        """One step of ``batch``; the batch in this slot afterwards (the next queued one when it ended)."""
        tokens = self._receive_tokens(batch)
        if not self.last:
            self._send(tokens, 1)
        self._apply(batch, tokens)
        if not batch.rows:
            self._cache_bytes.pop(id(batch), None)
            if self.last:
                self._finish(batch)
            if not queue:
                return None
            batch = queue.popleft()
            self._prefill(batch)
            return batch
        x = self.stage.step_input(batch) if self.first else self._receive_hidden(len(batch.rows), 1)
        self._forward(x, batch)
        return batch

    def _forward(self, x: torch.Tensor, batch: Batch) -> None:
        out = self.stage.forward(x, batch)
        self._cache_bytes[id(batch)] = self.stage.cache_bytes(batch)
        self.peak_cache_bytes = max(self.peak_cache_bytes, sum(self._cache_bytes.values()))
        if not self.last:
            self._send(out, 1)
            return
        chosen = choose(out, self.shard, self.decoding, batch.requests[batch.rows],
                        torch.full((len(batch.rows),), batch.generated, device=out.device), batch.history())
        if self.limits.forced_eos is not None and batch.generated == self.limits.max_new_tokens - 1:
            chosen = torch.full_like(chosen, self.limits.forced_eos)
        tokens = torch.full((batch.ids.shape[0],), -1, dtype=torch.long, device=chosen.device)
        tokens[batch.rows] = chosen
        batch.timestamps.append(time.perf_counter() - self.start)
        if self.link is None:
            batch.pending = tokens
        else:
            self._send(tokens, 1)

    def _apply(self, batch: Batch, tokens: torch.Tensor) -> None:
        """Append a step's tokens; the rows that stopped leave."""
        batch.append(tokens.to(batch.ids.device))
        values = tokens.tolist()        # one host read per batch and step: which rows stop decides the shapes
        out_of_budget = batch.generated >= self.limits.max_new_tokens
        batch.keep([r for r in batch.rows if not out_of_budget and values[r] not in self.limits.stop_tokens])

    def _finish(self, batch: Batch) -> None:
        new_ids, new_mask = batch.ids[:, batch.prompt_width:], batch.mask[:, batch.prompt_width:]
        for row, request in enumerate(batch.requests.tolist()):
            tokens = new_ids[row][new_mask[row] == 1].tolist()
            self.outputs.append(Output(request, tokens, batch.timestamps[0],
                                       batch.timestamps[max(len(tokens) - 1, 0)]))

    def _receive_tokens(self, batch: Batch) -> torch.Tensor:
        if self.link is None:
            return batch.pending
        return self.link.receive((batch.ids.shape[0],), torch.long, -1)

    def _receive_hidden(self, rows: int, length: int) -> torch.Tensor:
        assert self.link is not None
        return self.link.receive((rows, length, self.stage.hidden_size), self.dtype, -1)

    def _send(self, tensor: torch.Tensor, offset: int) -> None:
        assert self.link is not None
        self.link.send(tensor, offset)
