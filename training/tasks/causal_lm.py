"""Causal language modelling: packed blocks of ``data.seq_len`` tokens, next-token cross-entropy (vocabulary
parallel under TP), token-weighted validation loss and perplexity."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from modeling.losses import context_share, mean_loss, next_token_targets, router_aux_loss, token_losses
from parallel.context import local_tokens
from parallel.groups import ProcessGroups
from training import data
from training.config import ConfigError
from training.data import BatchPlan
from training.metrics import perplexity, sum_over
from training.steps import Step
from training.tasks import Task


class CausalLM(Task):
    def check_fits(self, model_config: Any) -> None:
        from modeling.build import check_sequence_fits

        if getattr(model_config, "is_encoder_decoder", False):
            raise ConfigError(f"model_type {model_config.model_type!r} is an encoder-decoder model: set "
                              f"data.source_field and data.target_field to the columns of the source and target "
                              f"text")
        check_sequence_fits(model_config, self.cfg.data.seq_len)
        if self.cfg.parallel.context > 1 and getattr(model_config, "output_router_logits", False):
            raise ConfigError(f"parallel.context={self.cfg.parallel.context} with model.config.output_router_logits="
                              f"true: {model_config.model_type!r}'s load-balancing loss over split sequences is not "
                              f"implemented; set model.config.output_router_logits=false or parallel.context=1")

    def texts(self, files: list[str]) -> Iterable[str]:
        texts = data.load_texts(files, "data.train_files", self.cfg.data.text_field, self.cfg.data.cache_dir)
        return (row["text"] for row in texts)

    def blocks(self, tokenizer: Any, files: list[str], key: str) -> Any:
        texts = data.load_texts(files, key, self.cfg.data.text_field, self.cfg.data.cache_dir)
        return data.tokenize_and_pack(texts, tokenizer, self.cfg.data.seq_len, key)

    def tokens_per_step(self, plan: BatchPlan) -> int | None:
        return plan.global_batch * self.cfg.data.seq_len

    def loss(self, engine: Any, batch: dict[str, torch.Tensor], groups: ProcessGroups) -> torch.Tensor:
        documents, chunk = batch.get("position_ids"), self.cfg.parallel.loss_chunk_tokens  # data.separate_documents
        if groups.context > 1:
            ids, positions, targets = local_tokens(batch["input_ids"], batch["labels"], groups.cp_group, documents)
            losses, _ = token_losses(engine.module, lambda: engine(input_ids=ids, position_ids=positions,
                                                                  use_cache=False), targets, chunk)
            return context_share(losses, targets, groups.context)
        extra = {} if documents is None else {"position_ids": documents}
        targets = next_token_targets(batch["labels"])
        losses, output = token_losses(engine.module, lambda: engine(input_ids=batch["input_ids"], use_cache=False,
                                                                    **extra), targets, chunk)  # no KV cache
        sequence_group = groups.tp_group if self.cfg.parallel.sequence_parallel else None
        return mean_loss(losses, targets) + router_aux_loss(engine.module, output, targets.numel(), sequence_group)

    @torch.no_grad()
    def evaluate(self, step: Step, engine: Any, blocks: Any, groups: ProcessGroups,
                 tokenizer: Any) -> dict[str, Any]:
        """Token-weighted mean NLL over the validation blocks, sharded over data-parallel ranks."""
        engine.eval()
        batches = data.eval_batches(blocks, self.cfg.train.micro_batch_size, groups.sample_rank, groups.replicas,
                                    self.cfg.train.eval_batches,
                                    tokenizer.eos_token_id if self.cfg.data.separate_documents else None)
        total_nll, total_tokens = step.eval_sums(batches)
        engine.train()
        total_nll, total_tokens = sum_over(groups.dp_group, total_nll, total_tokens)
        mean = total_nll / max(total_tokens, 1.0)
        return {"eval_loss": mean, "perplexity": perplexity(mean)}
