"""A fuzz of layouts: random valid combinations of tensor, pipeline and data degrees, ZeRO stage, schedule
(ZB-H1 included), virtual stages, sequence parallelism, micro-batch size, gradient accumulation and
architecture train 3 steps and match the independent single-process reference.

    FUZZ_DRAWS=40 FUZZ_SEED=1 python -m pytest -s tests/test_layout_fuzz.py     # a longer run
    FUZZ_SEED=1 FUZZ_ONLY=7 python -m pytest -s tests/test_layout_fuzz.py       # one draw again
    FUZZ_SCHEDULE=zb-h1 FUZZ_DRAWS=6 python -m pytest -s tests/test_layout_fuzz.py  # only one schedule's draws

The default (4 draws, seed 2026) keeps the test suite short; a failing draw's message is the command that
reproduces it."""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.dist import run_ranks
from tests.helpers import TINY_GPT2, TINY_LLAMA, reference_losses, run_config, step_records, tiny_config, write_corpus
from training.config import ConfigError

pytestmark = pytest.mark.multiprocess

ARCHS = {"gpt2": dict(TINY_GPT2, n_layer=4, n_head=4),
         "llama": dict(TINY_LLAMA, num_hidden_layers=4),
         "qwen2": dict(TINY_LLAMA, num_hidden_layers=4)}  # q/k/v biases, through the Llama plan
MAX_PROCS = 4
TOL = 1e-4  # the parity tests' (test_pipeline_training): fp32 summation order only, ~1e-6 observed


def draw(rng: random.Random) -> dict:
    """One combination (not yet checked against the config's rules)."""
    tensor, pipeline, data = (rng.choice([1, 2]) for _ in range(3))
    schedule = rng.choice(["1f1b", "gpipe", "interleaved", "zb-h1"]) if pipeline > 1 else "1f1b"
    return {"arch": rng.choice(sorted(ARCHS)), "tensor": tensor, "pipeline": pipeline, "data": data,
            "zero_stage": rng.choice([0, 1, 2, 3]), "schedule": schedule,
            "virtual_stages": 2 if schedule == "interleaved" else 1,
            "sequence_parallel": tensor > 1 and rng.random() < 0.5,
            "micro_batch_size": rng.choice([1, 2]), "grad_accum": rng.choice([1, 2, 4])}


def valid_draws(seed: int, count: int, corpus, tmp, schedule: str | None = None) -> list[tuple[int, dict, object]]:
    """The first ``count`` draws of ``seed`` that the config accepts and fit ``MAX_PROCS`` processes (with
    ``schedule``: only pipelines of that schedule)."""
    rng, found, index = random.Random(seed), [], 0
    while len(found) < count:
        point = draw(rng)
        index += 1
        if point["tensor"] * point["pipeline"] * point["data"] > MAX_PROCS:
            continue
        if schedule is not None and (point["pipeline"] == 1 or point["schedule"] != schedule):
            continue
        try:
            cfg = config_of(point, corpus, tmp / f"draw{index}")
        except ConfigError:
            continue  # a combination the config refuses (with its reason), e.g. ZeRO-0 with a pipeline
        found.append((index, point, cfg))
    return found


def config_of(point: dict, corpus, tmp):
    return tiny_config(tmp, corpus, model={"arch": point["arch"], "tokenizer": "byte", "config": ARCHS[point["arch"]]},
                       parallel={k: point[k] for k in ("tensor", "pipeline", "zero_stage", "schedule",
                                                       "virtual_stages", "sequence_parallel")},
                       train__steps=3, train__micro_batch_size=point["micro_batch_size"],
                       train__grad_accum=point["grad_accum"], train__save_final=False)


@pytest.mark.slow
def test_random_layouts_match_the_single_process_reference(tmp_path):
    seed, draws = int(os.environ.get("FUZZ_SEED", 2026)), int(os.environ.get("FUZZ_DRAWS", 4))
    only = os.environ.get("FUZZ_ONLY")
    corpus = write_corpus(tmp_path / "corpus")
    chosen = valid_draws(seed, draws if only is None else int(only), corpus, tmp_path,
                         os.environ.get("FUZZ_SCHEDULE"))
    if only is not None:
        chosen = [d for d in chosen if d[0] == int(only)] or pytest.skip(f"draw {only} is not a valid one")
    started, failures = time.monotonic(), []
    for index, point, cfg in chosen:
        ref_loss, ref_norm = reference_losses(cfg, global_batch=point["micro_batch_size"] * point["grad_accum"]
                                              * point["data"])
        world = point["tensor"] * point["pipeline"] * point["data"]
        steps = step_records(run_ranks(run_config, world, cfg, timeout=600)[0])
        worst = max(max(abs(r["loss"] - e) / e for r, e in zip(steps, ref_loss)),
                    max(abs(r["grad_norm"] - e) / e for r, e in zip(steps, ref_norm)))
        print(f"draw {index}: {point}: {worst:.1e}")
        if len(steps) != 3 or worst > TOL:
            failures.append(f"draw {index} {point}: {worst:.2e} from the reference; reproduce with "
                            f"FUZZ_SEED={seed} FUZZ_ONLY={index} python -m pytest -s tests/test_layout_fuzz.py")
    print(f"{len(chosen)} draws (seed {seed}) in {time.monotonic() - started:.0f} s, {len(failures)} differ")
    assert not failures, "\n".join(failures)
