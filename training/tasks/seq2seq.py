"""Sequence-to-sequence (encoder-decoder) runs: source/target pairs padded per micro-batch, the training loss
on vocabulary-parallel logits, and evaluation through the parallel model: token-weighted loss and perplexity of
the validation targets, and sacreBLEU of generated translations (greedy or beam search)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from modeling.generation import generate, greedy_seq2seq
from modeling.losses import mean_loss, token_losses
from parallel.groups import ProcessGroups
from training import data
from training.config import ConfigError, RunConfig
from training.metrics import perplexity, sum_over
from training.steps import Step
from training.tasks import Task


class Seq2Seq(Task):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        if cfg.data.source_field is None or cfg.data.target_field is None:  # the schema requires both together
            raise ValueError("a sequence-to-sequence task needs data.source_field and data.target_field")
        self.source_field, self.target_field = cfg.data.source_field, cfg.data.target_field

    def check_fits(self, model_config: Any) -> None:
        from modeling.build import check_sequence_fits

        if not getattr(model_config, "is_encoder_decoder", False):
            raise ConfigError(f"data.source_field={self.cfg.data.source_field!r} makes this a sequence-to-sequence "
                              f"run, but model_type {model_config.model_type!r} is decoder-only; use an "
                              f"encoder-decoder model (t5, marian, bart) or remove data.source_field / "
                              f"data.target_field")
        check_sequence_fits(model_config, self.cfg.data.seq_len, self.cfg.data.max_target_len)

    def _pairs(self, files: list[str], key: str) -> Any:
        return data.load_pairs(files, key, self.source_field, self.target_field, self.cfg.data.cache_dir)

    def texts(self, files: list[str]) -> Iterable[str]:
        return (text for row in self._pairs(files, "data.train_files") for text in (row["source"], row["target"]))

    def blocks(self, tokenizer: Any, files: list[str], key: str) -> Any:
        return data.tokenize_pairs(self._pairs(files, key), tokenizer, self.cfg.data.seq_len,
                                   self.cfg.data.max_target_len, key)

    def model_tokens(self, tokenizer: Any) -> dict[str, int]:
        tokens = super().model_tokens(tokenizer)
        if tokenizer.pad_token_id is not None:
            tokens["decoder_start_token_id"] = tokenizer.pad_token_id  # T5 / Marian convention
        return tokens

    def pad_id(self, tokenizer: Any) -> int | None:
        return tokenizer.pad_token_id

    def loss(self, engine: Any, batch: dict[str, torch.Tensor], groups: ProcessGroups) -> torch.Tensor:
        """Mean loss over the micro-batch's target tokens (padding excluded), as transformers computes it."""
        return mean_loss(_losses(engine, batch, self.cfg.parallel.loss_chunk_tokens), batch["labels"])

    def evaluate(self, step: Step, engine: Any, blocks: Any, groups: ProcessGroups,
                 tokenizer: Any) -> dict[str, Any]:
        metrics, signature = evaluate(engine, blocks, self.cfg, groups, tokenizer)
        return {**metrics, **({"bleu_signature": signature} if signature else {})}


def _decoder_input_ids(model_engine: Any, labels: torch.Tensor) -> torch.Tensor:
    """The labels shifted right (the model's own rule: start token, -100 -> padding)."""
    return model_engine.module.prepare_decoder_input_ids_from_labels(labels=labels)


def _losses(model_engine: Any, batch: dict[str, torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    """Per-token NLL of the labels (0 at padding), the decoder fed ``_decoder_input_ids``."""
    decoder_input_ids = _decoder_input_ids(model_engine, batch["labels"])
    losses, _ = token_losses(model_engine.module, lambda: model_engine(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_input_ids),
        batch["labels"], chunk_tokens)
    return losses


@torch.no_grad()
def evaluate(model_engine: Any, examples: Any, cfg: RunConfig, groups: ProcessGroups,
             tokenizer: Any) -> tuple[dict[str, float], str | None]:
    """(metrics, sacreBLEU signature): ``eval_loss`` (mean NLL per target token), ``perplexity`` and, with
    ``eval.bleu``, ``bleu`` over the first ``eval.bleu_samples`` validation examples."""
    import sacrebleu

    model_engine.eval()
    module, device = model_engine.module, model_engine.device
    pad_id = tokenizer.pad_token_id
    bleu_limit = min(len(examples), cfg.eval.bleu_samples or len(examples))
    synced = cfg.parallel.zero_stage == 3 and groups.data > 1  # every rank must keep calling forward
    nll = torch.zeros((), dtype=torch.float64, device=device)  # sums stay on the device through the loop
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    hypotheses, references = [], []
    per_round = cfg.train.micro_batch_size * groups.data
    for round_index, (positions, real) in enumerate(data.eval_rounds(
            len(examples), cfg.train.micro_batch_size, groups.dp_rank, groups.data, cfg.train.eval_batches)):
        rows = examples.select(positions)[:]
        batch = {k: v.to(device) for k, v in data.pad_pairs(rows, pad_id).items()}
        labels = batch["labels"].masked_fill(~torch.tensor(real, device=device).unsqueeze(1), -100)
        losses = _losses(model_engine, {**batch, "labels": labels}, cfg.parallel.loss_chunk_tokens)
        nll += losses.double().sum()
        tokens += (labels != -100).sum()
        if cfg.eval.bleu and round_index * per_round < bleu_limit:  # every rank alike: generate may be collective
            texts = tokenizer.batch_decode(_translate(module, groups, batch, cfg, synced), skip_special_tokens=True)
            for row, (text, position, is_real) in enumerate(zip(texts, positions, real)):
                if is_real and position < bleu_limit:
                    hypotheses.append(text.strip())
                    references.append(rows["target"][row])
    model_engine.train()
    nll_sum, token_sum = sum_over(groups.dp_group, nll, tokens)
    mean = nll_sum / max(token_sum, 1.0)
    metrics = {"eval_loss": mean, "perplexity": perplexity(mean)}
    if not cfg.eval.bleu:
        return metrics, None
    gathered: list[Any] = [None] * groups.data
    dist.all_gather_object(gathered, (hypotheses, references), group=groups.dp_group)
    hypotheses = [h for part, _ in gathered for h in part]
    references = [r for _, part in gathered for r in part]
    bleu = sacrebleu.metrics.BLEU()
    score = bleu.corpus_score(hypotheses, [references])
    metrics["bleu"] = score.score
    return metrics, str(bleu.get_signature())


def _translate(module: Any, groups: Any, batch: dict, cfg: Any, synced: bool) -> Any:
    """Greedy: on the vocabulary shards with reused caches; beam search and ZeRO-3 (every rank keeps calling the
    forward): HF's ``generate`` on gathered logits."""
    if cfg.eval.num_beams == 1 and not synced:
        return greedy_seq2seq(module, groups.tp_group, batch["input_ids"], batch["attention_mask"],
                              cfg.eval.max_new_tokens)
    return generate(module, groups.tp_group, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    num_beams=cfg.eval.num_beams, max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                    synced_gpus=synced)
