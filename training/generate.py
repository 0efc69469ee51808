"""Generate from a model at any tensor x pipeline layout, from an HF directory or a colonnade checkpoint:

    python -m training.generate --model runs/quickstart --prompts prompts.txt --max-new-tokens 64
    deepspeed --num_gpus 2 --module training.generate --model runs/quickstart --pipeline 2 --prompts prompts.txt
    torchrun --nproc_per_node 4 -m training.generate --model runs/quickstart --tensor 2 --pipeline 2 \\
        --prompts prompts.jsonl --temperature 0.8 --top-p 0.9 --seed 1 --out out.jsonl

Each rank loads only its part of the weights (``modeling.materialize``, as training does). Ranks beyond
tensor x pipeline are data-parallel replicas that take every ``data``-th request. Prompts are lines of a text
file, ``{"prompt": ...}`` lines of a JSONL file, or stdin (``-``); the output has one JSON line per prompt (id,
prompt, text, token ids, time to first token, time per output token). ``generate`` is the same as a function.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from modeling.build import auto_class, load_tokenizer
from modeling.decoding import DecoderStage, Seq2SeqStage
from modeling.materialize import StoredWeights, WeightsError, empty_model, materialize
from modeling.pipeline import PipelineChunk, split_chunks
from modeling.tensor_parallel import tensor_parallelize
from parallel.comm import comm_device
from parallel.decode_schedule import Batch, DecodeSchedule, Limits, Output
from parallel.groups import ProcessGroups
from parallel.p2p import StageLink
from parallel.partition import chunks_of_rank, stage_specs
from parallel.sampling import Decoding
from training.checkpoint.export import find_checkpoint
from training.checkpoint.files import MANIFEST, CheckpointError
from training.checkpoint.loading import CheckpointWeights, check_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class GenerateOptions:
    """Everything but the prompts: the model, the layout, and how tokens are chosen."""

    model: str
    tensor: int = 1
    pipeline: int = 1
    decoding: Decoding = field(default_factory=Decoding)
    max_new_tokens: int = 64
    stop: tuple[int, ...] | None = None       # token ids; None: the model's end-of-sequence tokens
    batches: int | None = None                 # batches in flight per replica; None: one per pipeline stage
    batch_size: int | None = None              # requests per batch; None: the replica's requests over ``batches``
    dtype: str = "fp32"
    int8: bool = False


@dataclass
class LoadedModel:
    model: Any
    stage: Any
    tokenizer: Any
    groups: ProcessGroups
    device: torch.device


def model_files(path: Path) -> Path:
    """The directory holding config.json and the weights: an HF directory, a checkpoint, or a run's newest."""
    if (path / "config.json").is_file() and not (path / MANIFEST).is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such directory")
    return find_checkpoint(path)


def load(options: GenerateOptions) -> LoadedModel:
    """This rank's part of the model at the options' layout, with its decoding stage. Collective."""
    from transformers import AutoConfig

    world, ranks = dist.get_world_size(), options.tensor * options.pipeline
    if world % ranks:
        raise ValueError(f"--tensor {options.tensor} x --pipeline {options.pipeline} = {ranks} ranks do not divide the "
                         f"{world} launched; launch a multiple of {ranks} (torchrun --nproc_per_node {ranks})")
    groups = ProcessGroups.from_degrees(options.tensor, options.pipeline)
    path = model_files(Path(options.model))
    hf = AutoConfig.from_pretrained(str(path))
    if hf.is_encoder_decoder and options.pipeline > 1:
        raise ValueError(f"--pipeline {options.pipeline}: encoder-decoder models ({hf.model_type}) generate at "
                         f"pipeline 1 (any tensor size)")
    full = empty_model(auto_class(hf), hf)
    checkpoint = (path / MANIFEST).is_file()
    if checkpoint:
        check_weights(full, path)
    model = tensor_parallelize(copy.deepcopy(full), groups.tp_group)
    chunk = None
    if options.pipeline > 1:
        specs = chunks_of_rank(stage_specs(hf.num_hidden_layers, options.pipeline), options.pipeline,
                               groups.pp_rank)
        chunk = cast(PipelineChunk, split_chunks(model, specs, seq_len=1)[0])
    source = CheckpointWeights(path) if checkpoint else StoredWeights(path, "--model")
    kept: nn.Module = chunk if chunk is not None else model  # the rest stays on the meta device
    materialize(full, model, kept, source, groups.tp_group)
    device = comm_device()                                  # the GPU of this rank under NCCL
    kept.to(device=device, dtype=DTYPES[options.dtype])
    model.eval()
    if options.int8:
        from modeling.quantize import quantize_int8

        quantize_int8(kept)
    stage = Seq2SeqStage(model) if hf.is_encoder_decoder else DecoderStage(model, chunk)
    return LoadedModel(model, stage, load_tokenizer(path), groups, device)


def stop_tokens(model: Any, stop: tuple[int, ...] | None) -> frozenset[int]:
    if stop is not None:
        return frozenset(stop)
    eos = model.generation_config.eos_token_id
    return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)


def check_lengths(config: Any, prompts: list[list[int]], max_new_tokens: int) -> None:
    """A prompt that with its new tokens would pass the model's positions is an error naming it."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if config.is_encoder_decoder or not limit:
        return
    for index, prompt in enumerate(prompts):
        if len(prompt) + max_new_tokens > limit:
            raise ValueError(f"prompt {index}: {len(prompt)} tokens + --max-new-tokens {max_new_tokens} pass the "
                             f"model's {limit} positions; shorten it or lower --max-new-tokens")


def replica_batches(loaded: LoadedModel, prompts: list[list[int]], options: GenerateOptions) -> list[Batch]:
    """This data-parallel replica's requests (every ``data``-th), in batches."""
    groups = loaded.groups
    mine = list(range(groups.dp_rank, len(prompts), groups.data))
    slots = options.batches or options.pipeline
    size = options.batch_size or max(1, -(-len(mine) // slots))
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    return [Batch.from_prompts(mine[i:i + size], [prompts[r] for r in mine[i:i + size]], pad, loaded.device,
                         loaded.stage.pads_left) for i in range(0, len(mine), size)]


@dataclass
class Decoded:
    """Every request's output (sorted by request) and, per rank, what it held and how long it took."""

    outputs: list[Output]
    ranks: list[dict]


def decode(loaded: LoadedModel, prompts: list[list[int]], options: GenerateOptions) -> Decoded:
    """Decode token-id prompts; the result on every rank. Collective."""
    groups, model = loaded.groups, loaded.model
    check_lengths(model.config, prompts, options.max_new_tokens)
    link = None
    if groups.pipeline > 1:
        link = StageLink(groups.pp_ranks, groups.pp_rank, comm_device(groups.pp_group))
    forced = getattr(model.generation_config, "forced_eos_token_id", None)
    limits = Limits(options.max_new_tokens, stop_tokens(model, options.stop), forced)
    schedule = DecodeSchedule(loaded.stage, link, loaded.stage.vocab_shard(groups.tp_group), options.decoding,
                              limits, DTYPES[options.dtype])
    dist.barrier()
    with torch.no_grad():
        mine = schedule.run(replica_batches(loaded, prompts, options), options.batches or options.pipeline)
    stats = {"rank": groups.rank, "tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank, "dp_rank": groups.dp_rank,
             "cache_bytes": schedule.peak_cache_bytes, "seconds": time.perf_counter() - schedule.start}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (mine if groups.tp_rank == 0 else [], stats))
    outputs = sorted((o for held, _ in everyone for o in held), key=lambda o: o.request)
    return Decoded(outputs, [rank_stats for _, rank_stats in everyone])


def generate(prompts: list[str], options: GenerateOptions, loaded: LoadedModel | None = None) -> list[dict]:
    """The JSON records of ``prompts`` (text) under ``options``: on every rank. Collective."""
    loaded = loaded or load(options)
    ids = [loaded.tokenizer(p)["input_ids"] for p in prompts]
    decoded = decode(loaded, ids, options)
    return [record(o, prompts[o.request], loaded.tokenizer) for o in decoded.outputs]


def record(output: Output, prompt: str, tokenizer: Any) -> dict:
    count = len(output.tokens)
    per_token = (output.last_token_s - output.first_token_s) / (count - 1) if count > 1 else None
    return {"id": output.request, "prompt": prompt, "text": tokenizer.decode(output.tokens, skip_special_tokens=True),
            "token_ids": output.tokens, "ttft_s": round(output.first_token_s, 6),
            "tpot_s": None if per_token is None else round(per_token, 6)}


def read_prompts(source: str) -> list[str]:
    """Lines of a text file, ``prompt`` fields of a .jsonl file, or stdin's lines for ``-``."""
    if source == "-":
        lines = sys.stdin.read().splitlines()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {source}: no such file")
        lines = path.read_text().splitlines()
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in lines if line.strip()]
            if any("prompt" not in row for row in rows):
                raise ValueError(f"--prompts {source}: every JSON line needs a \"prompt\" field")
            return [row["prompt"] for row in rows]
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {source}: no prompts (one per line)")
    return prompts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF directory, colonnade checkpoint or run directory")
    parser.add_argument("--prompts", default="-", help="text file (one prompt per line), .jsonl, or - for stdin")
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", nargs="*", type=int, help="stop token ids (default: the model's eos)")
    parser.add_argument("--batches", type=int, help="batches in flight per replica (default: --pipeline)")
    parser.add_argument("--batch-size", type=int, help="requests per batch (default: all over --batches)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--int8", action="store_true", help="weight-only int8 linear and embedding layers")
    parser.add_argument("--out", help="write the JSON lines here (default: stdout)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the LOCAL_RANK environment variable is used")
    return parser.parse_args(argv)


def options_of(args: argparse.Namespace) -> GenerateOptions:
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.max_new_tokens < 1:
        raise ValueError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0, --max-new-tokens >= 1")
    decoding = Decoding(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    return GenerateOptions(args.model, args.tensor, args.pipeline, decoding, args.max_new_tokens,
                           tuple(args.stop) if args.stop else None, args.batches, args.batch_size, args.dtype,
                           args.int8)


def main(argv: list[str] | None = None) -> int:
    from training.lifecycle import init_distributed

    args = parse_args(argv)
    try:
        options = options_of(args)
        prompts = read_prompts(args.prompts)
        init_distributed()
        records = generate(prompts, options)
    except (ValueError, FileNotFoundError, CheckpointError, WeightsError) as error:
        if os.environ.get("RANK", "0") == "0":  # every rank meets the same error: say it once
            print(f"generate: {error}", file=sys.stderr)
        return 2
    if dist.get_rank() == 0:
        text = "".join(json.dumps(r) + "\n" for r in records)
        if args.out:
            Path(args.out).write_text(text)
        else:
            sys.stdout.write(text)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
