"""bench context and the planner's context parallelism: the search for the longest sequence within a budget
(made-up linear memory, failed runs, nothing fitting, the position limit), the context traffic and the planner's
arithmetic by hand (Ulysses' all-to-alls, the ring's sends, their price, the compute shared by the context
ranks, ZeRO over data x context, activations per rank), the bars and the report, and bad input refused in one
line before any launch. The command itself is run for bench/results/context-cpu (about 20 minutes: not here)."""

from __future__ import annotations

import math

import pytest

from bench.cli import BadInput
from bench.context import main
from bench.context_report import report
from bench.context_search import bars, longest, next_length, quantum
from bench.formulas import context_attention_bytes, model_state_bytes
from bench.variant import parse_variant
from tests.helpers import TINY_LLAMA, tiny_config, write_corpus

MIB = 2**20


def _linear(fixed: float, per_token: float, fail_above: int | None = None):
    """A probe whose peak is ``fixed + per_token x seq_len``; runs longer than ``fail_above`` crash."""
    calls: list[int] = []

    def probe(seq_len: int) -> tuple[float, bool]:
        calls.append(seq_len)
        return fixed + per_token * seq_len, fail_above is None or seq_len <= fail_above

    return probe, calls


@pytest.mark.unit
@pytest.mark.parametrize("context, start", [(1, 2048), (2, 512), (4, 30000)])
def test_search_finds_the_last_multiple_within_the_budget_and_probes_the_next(context, start):
    q = quantum(context)
    assert q == 128 * context
    probe, calls = _linear(100 * MIB, 80 * 1024 / context)  # 80 KB per token over N ranks
    budget = 512 * MIB
    best, trials = longest(probe, budget, q, start, 131072)
    exact = (budget - 100 * MIB) / (80 * 1024 / context)  # 5,273.6 tokens at N=1
    assert best == int(exact // q) * q and best + q in calls  # the answer fitted, one quantum more did not
    assert all(t.fits == (t.peak <= budget) for t in trials)
    assert len(calls) <= 6 and len(set(calls)) == len(calls)


@pytest.mark.unit
def test_search_bisects_failed_runs_halves_from_a_failing_start_and_stops_at_the_limit():
    probe, calls = _linear(0, 1.0, fail_above=3000)  # crashes (no peak) above 3,000 tokens, budget never binds
    best, trials = longest(probe, 1e12, 128, 2048, 131072)
    assert best == 2944 and 3072 in calls and math.isinf(next(t.peak for t in trials if t.seq_len == 3072))
    best, trials = longest(_linear(0, 1.0)[0], 1000.0, 128, 4096, 131072)  # halved from a start far too long
    assert best == 896 and [t.seq_len for t in trials] == [4096, 2048, 1024, 512, 896]
    assert longest(_linear(5000, 1.0)[0], 1000.0, 128, 1024, 131072)[0] == 0  # nothing fits, down to one quantum
    best, trials = longest(_linear(0, 1.0)[0], 1e12, 128, 1024, 4096)  # the limit: 4,096 fits, nothing longer
    assert best == 4096 and max(t.seq_len for t in trials) == 4096
    assert next_length([], 1.0, 256, 100, 4096) == 256  # the first probe is a multiple of the quantum


@pytest.mark.unit
def test_context_traffic_by_hand():
    # Ulysses, the bench's Llama at N=2, 2,048 tokens: q and out 8 heads, k and v 4, head_dim 32, fp32; each
    # all-to-all sends half of this rank's 1,024 tokens: 1/2 x 1,024 x (8 + 8 + 4 + 4) x 32 x 4 bytes
    assert context_attention_bytes("ulysses", 1, 2048, 8, 4, 32, 2) == {"forward": 1572864.0, "backward": 1572864.0}
    # N=4: 3/4 of 512 tokens; 2 key/value heads are repeated to 4 (each rank then holds the one its queries use)
    assert context_attention_bytes("ulysses", 1, 2048, 8, 4, 32, 4)["forward"] == 0.75 * 512 * 24 * 32 * 4
    assert context_attention_bytes("ulysses", 1, 2048, 8, 2, 32, 4)["forward"] == 0.75 * 512 * 24 * 32 * 4
    # ring, N=2, 8 tokens, 2 kv heads of 4: a block is k + v (2 x 4 x 2 x 4 x 4 = 256 bytes) and 4 int64 positions
    # (32); forward 1 block send; backward 1 block send and 2 sends of the fp32 dk/dv accumulators (256 each)
    assert context_attention_bytes("ring", 1, 8, 4, 2, 4, 2) == {"forward": 288.0, "backward": 288.0 + 512}
    # bf16 blocks, fp32 accumulators
    assert context_attention_bytes("ring", 1, 8, 4, 2, 4, 2, width=2)["backward"] == 128 + 32 + 512
    assert context_attention_bytes("ulysses", 1, 2048, 8, 4, 32, 1) == {"forward": 0.0, "backward": 0.0}
    with pytest.raises(ValueError, match="ulysses or ring"):
        context_attention_bytes("auto", 1, 8, 4, 2, 4, 2)


def _llama(tmp_path, **parallel):
    return tiny_config(tmp_path, write_corpus(tmp_path / "corpus"),
                       model={"arch": "llama", "tokenizer": "byte", "config": TINY_LLAMA},
                       parallel={"zero_stage": 1, **parallel})


@pytest.mark.unit
def test_planner_splits_activations_over_context_ranks_and_prices_their_traffic(tmp_path):
    """Context 2 at 2 ranks (one replica): the planned activations per rank about half of one rank's (every
    tensor per token, the attention's by its kernel), the model state partitioned over the 2 ranks as
    ZeRO-1 at DP=2, the step's compute halved and the Ulysses traffic priced by hand."""
    from bench.plan_search import step_seconds
    from bench.plan_stages import plan_layout
    from bench.plan_trace import full_meta_model

    one, two = _llama(tmp_path), _llama(tmp_path, context=2)
    (alone,), (split,) = plan_layout(one, 1), plan_layout(two, 2)
    assert split.params == alone.params
    assert 0.5 <= split.activations / alone.activations <= 0.56, (split.activations, alone.activations)
    assert split.model_state == model_state_bytes(alone.params, 1, 2)
    fits = {"all_gather": {"alpha_s": 1e-3, "bandwidth_Bps": 1e6}, "all_reduce": {"alpha_s": 0.0, "bandwidth_Bps": 1e9},
            "send_recv": {"alpha_s": 0.0, "bandwidth_Bps": 1e9}}
    full = full_meta_model(one)
    base, cp = (step_seconds(cfg, full, data, [stage], fits, 1e12)
                for cfg, data, stage in ((one, 1, alone), (two, 2, split)))
    assert cp["compute_s"] == pytest.approx(base["compute_s"] / 2)
    # micro-batch 2 x 32 tokens, 16 per rank and sequence: each all-to-all's input is 32 tokens x 4 heads x 8
    # (q, out) or 2 x 8 (k, v) x 4 bytes; 8 per layer at 1 ms + bytes / 1 MB/s, 2 layers
    inputs = 32 * (4 + 4 + 2 + 2) * 8 * 4 * 2  # forward and backward
    assert cp["cp_s"] == pytest.approx(2 * (8 * 1e-3 + inputs / 1e6)) and base["cp_s"] == 0
    assert cp["tokens_per_s"] == pytest.approx(2 * 32 / cp["step_s"])  # one replica's tokens


@pytest.mark.unit
def test_layout_variant_counts_context_ranks_as_processes():
    assert parse_variant("context=2") == ("context=2", ["parallel.context=2"], 2)
    assert parse_variant("data=2,context=2,zero=2") == ("data=2,context=2,zero=2",
                                                        ["parallel.context=2", "parallel.zero_stage=2"], 4)


def _row(context, seq_len, peak, ok=True, **extra):
    return {"context": context, "seq_len": seq_len, "ok": ok, "peak_bytes": peak, "activation_bytes": peak / 2,
            "step_s": 2.0, "tokens_per_s": seq_len / 2.0, "context_comm_s": 0.5, "comm_share": 0.25,
            "other_comm_s": 0.01, "context_bytes": 12 * MIB, **extra}


@pytest.mark.unit
def test_bars_and_report_by_hand():
    got = bars({1: 5120, 2: 9216, 4: 17408}, {1: 680 * MIB, 2: 360 * MIB})
    assert [(b["bar"], round(b["value"], 4), b["pass"]) for b in got] == [
        ("longest sequence N=2 / N=1", 1.8, True), ("longest sequence N=4 / N=1", 3.4, True),
        ("activation bytes per rank N=2 / N=1", round(360 / 680, 4), True)]
    assert not bars({1: 5120, 2: 9088}, {})[0]["pass"] and bars({2: 4096}, {2: 1.0}) == []
    fixed = [_row(1, 8192, 800 * MIB, method="-", planned_peak_bytes=760 * MIB, plan_error=-0.05,
                  formula_context_bytes=0.0),
             _row(2, 8192, 400 * MIB, method="ulysses", planned_peak_bytes=380 * MIB, plan_error=-0.05,
                  formula_context_bytes=12 * MIB, context_bytes_vs_formula=1.0)]
    searched = [{"context": 1, "longest": 5120, "trials": [_row(1, 5120, 500 * MIB, fits=True),
                                                           _row(1, 5248, 520 * MIB, fits=False)],
                 "at_longest": _row(1, 5120, 500 * MIB)}]
    text = report({"machine": {"date": "2026-12-07", "cpu": "cpu", "cores": 2, "torch": "2"}, "command": "c",
                   "model": "m", "fixed_seq": 8192, "budget_bytes": 512 * MIB, "fixed": fixed, "longest": searched,
                   "bars": got, "wall_s": 60.0})
    assert "| 2 | ulysses | 200 | 0.500 | 400 | 380 | -5.0% | 2.00 | 4,096 | 0.50 | 25.0% | 0.010 | 12.0 / 12.0 " \
           "(1.000) |" in text
    assert "| 1 | 5,120 | 1.00 | 5120: 500 yes, 5248: 520 no | 500 |" in text and "within 512 MiB" in text


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [(["--contexts", "1,0"], "--contexts 1,0: distinct degrees"),
                                           (["--contexts", "a"], "comma-separated whole numbers"),
                                           (["--parts", "fixed,fast"], "unknown fast"),
                                           (["--budget", "lots"], "--budget 'lots'"),
                                           (["--steps", "1"], "--steps 1: must be at least 2"),
                                           (["--fixed-seq", "8190"], "multiple of 2 x the largest N (8)")])
def test_bad_input_is_one_line_before_any_launch(argv, message, capsys):
    with pytest.raises(BadInput) as raised:
        main(argv)
    assert raised.value.code == 2 and message in str(raised.value)
    assert capsys.readouterr().err.count("\n") == 1
