"""Encoder-decoder (sequence-to-sequence) runs: the training loss on vocabulary-parallel logits, and
evaluation through the parallel model: token-weighted loss and perplexity of the validation targets, and
sacreBLEU of generated translations (greedy or beam search)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from modeling.parallelize import generate, seq2seq_loss, vocab_slice
from parallel.cross_entropy import vocab_parallel_cross_entropy
from training import data
from training.metrics import perplexity, sum_over


def _logits(model_engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Decoder inputs are the labels shifted right (the model's own rule: start token, -100 -> padding)."""
    decoder_input_ids = model_engine.module.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return model_engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=decoder_input_ids).logits


def step_loss(model_engine, batch: dict[str, torch.Tensor], groups) -> torch.Tensor:
    """Mean loss over the micro-batch's target tokens (padding excluded), as transformers computes it."""
    return seq2seq_loss(model_engine.module, _logits(model_engine, batch), batch["labels"], groups.tp_group)


@torch.no_grad()
def evaluate(model_engine, examples, cfg, groups, tokenizer) -> tuple[dict[str, float], str | None]:
    """(metrics, sacreBLEU signature): ``eval_loss`` (mean NLL per target token), ``perplexity`` and, with
    ``eval.bleu``, ``bleu`` over the first ``eval.bleu_samples`` validation examples."""
    import sacrebleu

    model_engine.eval()
    module, device = model_engine.module, model_engine.device
    start, valid = vocab_slice(module.get_output_embeddings())
    tp_group = groups.tp_group if valid is not None else None
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
        keep = labels != -100
        losses = vocab_parallel_cross_entropy(_logits(model_engine, {**batch, "labels": labels}),
                                              labels.masked_fill(~keep, 0), tp_group, start, valid)
        nll += (losses.double() * keep).sum()
        tokens += keep.sum()
        if cfg.eval.bleu and round_index * per_round < bleu_limit:  # every rank alike: generate may be collective
            out = generate(module, groups.tp_group, input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"], num_beams=cfg.eval.num_beams,
                           max_new_tokens=cfg.eval.max_new_tokens, do_sample=False, synced_gpus=synced)
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            for row, (text, position, is_real) in enumerate(zip(texts, positions, real)):
                if is_real and position < bleu_limit:
                    hypotheses.append(text.strip())
                    references.append(rows["target"][row])
    model_engine.train()
    nll, tokens = sum_over(groups.dp_group, nll, tokens)
    metrics = {"eval_loss": nll / max(tokens, 1.0), "perplexity": perplexity(nll / max(tokens, 1.0))}
    if not cfg.eval.bleu:
        return metrics, None
    gathered = [None] * groups.data
    dist.all_gather_object(gathered, (hypotheses, references), group=groups.dp_group)
    hypotheses = [h for part, _ in gathered for h in part]
    references = [r for _, part in gathered for r in part]
    bleu = sacrebleu.metrics.BLEU()
    score = bleu.corpus_score(hypotheses, [references])
    metrics["bleu"] = score.score
    return metrics, str(bleu.get_signature())
