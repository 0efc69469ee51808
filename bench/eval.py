"""Model quality through the parallel model: perplexity and BLEU of an HF export (or any local checkpoint),
at any tensor / pipeline layout, so the same number can be compared across layouts.

Perplexity is exp(total NLL / total predicted tokens) over the concatenated texts, with the sliding-window
method of the transformers documentation ("Perplexity of fixed-length models"): windows of ``max_length``
tokens advanced by ``stride``; only the tokens new to a window are scored, each with up to
``max_length - stride`` tokens of context. BLEU is sacreBLEU's corpus BLEU of greedy continuations of the
sources against one or more references, reported with its signature.

    python -m bench eval --model runs/quickstart/hf --text '{stdlib}/[t-z]*.py' --tensor 2

``--int8`` scores the model with weight-only int8 (``modeling.quantize``). The result's ``weight_bytes`` is the
bytes of parameters and persistent buffers summed over the ranks (a tensor every rank holds whole, a norm or a
row-parallel bias, counted on each), ``weight_bytes_per_rank`` each rank's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from bench.launch import add_worker_arguments, ran_as_worker


def windows(num_tokens: int, max_length: int, stride: int):
    """(begin, end, new_tokens) per window, as in the transformers perplexity guide."""
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        yield begin, end, end - prev_end
        prev_end = end
        if end == num_tokens:
            break


def bleu(hypotheses: list[str], references: list[list[str]]) -> dict:
    """sacreBLEU corpus BLEU; ``references`` is a list of reference streams (each as long as hypotheses)."""
    import sacrebleu

    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(hypotheses, references)
    return {"bleu": score.score, "signature": str(metric.get_signature())}



def _loss_chunk_tokens() -> int:
    """``parallel.loss_chunk_tokens`` as a run's default: the output layer and loss in chunks, as training."""
    from training.config_schema import ParallelConfig

    return int(ParallelConfig.model_fields["loss_chunk_tokens"].default)

class ParallelLM:
    """An HF causal LM sharded over tensor and pipeline groups, for scoring and greedy generation."""

    def __init__(self, model_dir: str, groups, max_length: int, int8: bool = False):
        import torch
        from transformers import AutoModelForCausalLM

        from modeling.build import load_tokenizer
        from modeling.pipeline import split_chunks
        from modeling.quantize import quantize_int8, weight_bytes
        from modeling.tensor_parallel import tensor_parallelize
        from parallel.partition import chunks_of_rank, stage_specs

        self.groups, self.max_length = groups, max_length
        self.tokenizer = load_tokenizer(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model = tensor_parallelize(model, groups.tp_group)
        self.hidden = model.config.hidden_size
        self.chunks = None
        if groups.pipeline > 1:
            layers = model.config.num_hidden_layers
            specs = chunks_of_rank(stage_specs(layers, groups.pipeline), groups.pipeline, groups.pp_rank)
            self.chunks = split_chunks(self.model, specs, max_length)
        # after the split (the chunks hold the same modules): a stage that does not embed gets stand-ins for the
        # embeddings that have parameters, which an int8 embedding has not
        self.quantized = quantize_int8(self.model) if int8 else 0
        self.weight_bytes = weight_bytes(self.model if self.chunks is None else self.chunks)

    def _stage_forward(self, ids, targets):
        """Run the pipeline for one sequence batch; the last stage returns the per-token losses, others None."""
        import torch

        from modeling.losses import token_losses
        from parallel.comm import comm_device
        from parallel.p2p import PipeComm
        from parallel.schedules import Op, run_schedule

        seq = ids.shape[1]
        for chunk in self.chunks:
            chunk.seq_len = seq
        comm = PipeComm(self.groups.pp_ranks, self.groups.pp_rank, (ids.shape[0], seq, self.hidden),
                        torch.float32, comm_device(self.groups.pp_group))
        out = {}

        def forward_step(c, k, x):
            chunk = self.chunks[c]
            x = ids if chunk.spec.embed else x
            if not chunk.spec.head:
                return chunk(x)
            out["losses"], _ = token_losses(chunk.model, lambda: chunk(x), targets, _loss_chunk_tokens())
            return out["losses"]

        run_schedule([Op("F", 0, 0)], p=self.groups.pipeline, v=1, rank=self.groups.pp_rank, comm=comm,
                     forward_step=forward_step, backward_step=None, forward_only=True)
        return out.get("losses")

    def nll(self, ids, scored_from: int) -> tuple[float, int]:
        """Summed NLL of ``ids[:, scored_from + 1:]`` given what precedes them, and their count."""
        import torch
        import torch.distributed as dist

        from modeling.losses import next_token_targets, token_losses

        targets = next_token_targets(ids)
        with torch.no_grad():
            if self.chunks is None:
                losses, _ = token_losses(self.model, lambda: self.model(input_ids=ids), targets,
                                         _loss_chunk_tokens())
            else:
                losses = self._stage_forward(ids, targets)
            values = torch.zeros(2, dtype=torch.float64)
            if losses is not None:
                scored = losses[:, scored_from:-1]  # the last position has no target
                values += torch.tensor([float(scored.sum()), scored.numel()], dtype=torch.float64)
            if self.groups.pipeline > 1:
                dist.all_reduce(values, group=self.groups.pp_group)
        return float(values[0]), int(values[1])

    def perplexity(self, text: str, stride: int) -> dict:
        import torch

        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        total, count = 0.0, 0
        for begin, end, new in windows(ids.shape[1], self.max_length, stride):
            window = ids[:, begin:end]
            # targets are window[1:]; the last `new` tokens are new (the first token of the text has no context)
            scored_from = max(0, window.shape[1] - new - 1) if begin > 0 else 0
            nll, n = self.nll(window, scored_from)
            total, count = total + nll, count + n
        mean = total / count
        return {"nll": mean, "perplexity": math.exp(mean), "tokens": count}

    def greedy(self, prompt: str, max_new_tokens: int) -> str:
        import torch

        from parallel.comm import gather_from_tensor_parallel_region

        if self.chunks is not None:
            raise ValueError("bench eval: BLEU generation runs at pipeline=1 (any tensor size)")
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        vocab = self.model.config.vocab_size
        new = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = self.model(input_ids=ids[:, -self.max_length:]).logits[:, -1:]
                logits = gather_from_tensor_parallel_region(logits, self.groups.tp_group)[..., :vocab]
                token = int(logits.argmax(-1))
                if token == self.tokenizer.eos_token_id:
                    break
                new.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return self.tokenizer.decode(new, skip_special_tokens=True)


def worker(args) -> None:
    import torch.distributed as dist

    from parallel.groups import ProcessGroups
    from training.data import expand_files
    from training.lifecycle import init_distributed

    init_distributed()
    groups = ProcessGroups.from_degrees(args.tensor, args.pipeline)
    lm = ParallelLM(args.model, groups, args.max_length, int8=args.int8)
    per_rank = _per_rank(lm.weight_bytes)
    result = {"model": args.model, "tensor": args.tensor, "pipeline": args.pipeline, "int8": args.int8,
              "weight_bytes": sum(per_rank), "weight_bytes_per_rank": per_rank}
    if args.text:
        files = expand_files(args.text, "--text")
        text = "\n\n".join(Path(f).read_text() for f in files)
        result.update(lm.perplexity(text, args.stride), max_length=args.max_length, stride=args.stride)
    if args.bleu_data:
        rows = [json.loads(line) for line in Path(args.bleu_data).read_text().splitlines() if line.strip()]
        hyps = [lm.greedy(r[args.source_field], args.max_new_tokens).strip() for r in rows]
        refs = [[r[args.target_field] if isinstance(r[args.target_field], str) else r[args.target_field][i]
                 for r in rows] for i in range(_num_refs(rows, args.target_field))]
        result.update(bleu(hyps, refs), hypotheses=hyps)
    if dist.get_rank() == 0:
        Path(args.out_file).write_text(json.dumps(result))


def _per_rank(value: int) -> list[int]:
    """``value`` of every rank, in rank order (on the collectives' device)."""
    import torch
    import torch.distributed as dist

    from parallel.comm import comm_device

    mine = torch.tensor([value], dtype=torch.int64, device=comm_device())
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [int(v) for v in everyone]


def _num_refs(rows, field) -> int:
    first = rows[0][field]
    return 1 if isinstance(first, str) else len(first)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF export or local checkpoint directory")
    parser.add_argument("--text", nargs="*", default=[], help="text files / globs for perplexity")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--bleu-data", help="jsonl with source and target (string or list of references)")
    parser.add_argument("--source-field", default="source")
    parser.add_argument("--target-field", default="target")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--int8", action="store_true",
                        help="weight-only int8 (modeling.quantize): every linear and embedding weight int8 with "
                             "per-output-channel scales, dequantised in the forward")
    parser.add_argument("--out", help="write the result JSON here")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if ran_as_worker(args, worker):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "eval.json"
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--out" and a != args.out]
        from bench.launch import torchrun

        proc = torchrun("bench.eval", args.tensor * args.pipeline,
                        ["--worker", "--out-file", str(out_file)] + forwarded, threads=1)
        if proc.returncode != 0:
            raise RuntimeError(f"eval failed:\n{proc.stderr[-4000:]}")
        result = json.loads(out_file.read_text())
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    for key in ("perplexity", "nll", "tokens", "bleu", "signature", "weight_bytes"):
        if key in result:
            print(f"{key}: {result[key]}")
    return result


if __name__ == "__main__":
    main()
