"""The task seam: what a run learns, as one object chosen once from the config. A task owns the shaping of its
data (texts for a tokenizer, tokenized blocks, padding), its loss on a micro-batch and its evaluation; the step
(training/steps.py) and the loop call it and never ask which task they run. Adding a task is one new module
here and one line in ``task_for``.

    causal LM   (``data.text_field``)                  training/tasks/causal_lm.py
    seq2seq     (``data.source_field`` / ``target_field``)  training/tasks/seq2seq.py
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from parallel.groups import ProcessGroups
    from training.config import RunConfig
    from training.data import BatchPlan
    from training.steps import Step


class Task(ABC):
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    @abstractmethod
    def check_fits(self, model_config: Any) -> None:
        """Raise ConfigError / ValueError when the model cannot learn this task from this data (before any
        data or model is built)."""

    @abstractmethod
    def texts(self, files: list[str]) -> Iterable[str]:
        """Every text of ``files`` a tokenizer is trained on."""

    @abstractmethod
    def blocks(self, tokenizer: Any, files: list[str], key: str) -> Any:
        """The tokenized examples of ``files`` (``key``: the config key naming them, for errors)."""

    def model_tokens(self, tokenizer: Any) -> dict[str, int]:
        """Token ids a from-scratch model's config takes from the tokenizer."""
        return {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if getattr(tokenizer, k) is not None}

    def pad_id(self, tokenizer: Any) -> int | None:
        """The padding id of training micro-batches (None: fixed-length blocks, no padding)."""
        return None

    def tokens_per_step(self, plan: BatchPlan) -> int | None:
        """Tokens one optimizer step trains on, when fixed (for ``tokens_per_s``)."""
        return None

    @abstractmethod
    def loss(self, engine: Any, batch: dict[str, torch.Tensor], groups: ProcessGroups) -> torch.Tensor:
        """The mean loss of one micro-batch (already on the engine's device)."""

    @abstractmethod
    def evaluate(self, step: Step, engine: Any, blocks: Any, groups: ProcessGroups,
                 tokenizer: Any) -> dict[str, Any]:
        """Metrics over the validation ``blocks`` (``eval_loss``, ``perplexity``, ...), equal on every rank."""


def task_for(cfg: RunConfig) -> Task:
    """Sequence-to-sequence when ``data.source_field`` names the source column, causal LM otherwise."""
    from training.tasks.causal_lm import CausalLM
    from training.tasks.seq2seq import Seq2Seq

    return Seq2Seq(cfg) if cfg.data.source_field else CausalLM(cfg)
