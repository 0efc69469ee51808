"""``python -m bench plan``: the planner's parameters and activations equal what real ranks hold, its
schedules' micro-batches in flight are the schedules', and its search keeps the layouts that fit."""

from __future__ import annotations

import json

import pytest
import torch

from bench import plan, plan_stages, plan_trace
from bench.memory import SavedActivations
from tests.dist import run_ranks
from tests.helpers import TINY_GPT2, TINY_LLAMA, tiny_config, write_corpus

DROPOUT = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
# Families whose plans come from transformers' declaration: per-head q/k norms (Qwen3, Gemma 3: sliding and full
# layers, tied embeddings), q/k norms over the full widths (OLMo 2), fused q|k|v and gate|up (Phi-3).
DECODER = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 64}
TINY_QWEN3 = {**DECODER, "head_dim": 8}
TINY_GEMMA3 = {**DECODER, "num_hidden_layers": 4, "head_dim": 16, "sliding_window": 8,
               "layer_types": ["sliding_attention", "full_attention"] * 2}
FAMILIES = {"qwen3": TINY_QWEN3, "gemma3_text": TINY_GEMMA3, "olmo2": DECODER, "phi3": DECODER, "llama": TINY_LLAMA}


def _config(tmp_path, arch="gpt2", model_config=None, **parallel):
    corpus = write_corpus(tmp_path / "corpus")
    return tiny_config(tmp_path, corpus, model={"arch": arch, "tokenizer": "byte",
                                                "config": model_config or {**TINY_GPT2, **DROPOUT}},
                       parallel={"zero_stage": 1, **parallel})


def _real_saved_bytes(cfg, tp_group=None) -> tuple[int, int, int]:
    """(parameters, bytes autograd saved, bytes of the logits) of one micro-batch on a real CPU model: the
    reference, measured by ``saved_tensors_hooks`` rather than by the planner's dispatch-level counter."""
    from modeling import lean, recompute
    from modeling.build import auto_class, byte_level_tokenizer, model_config
    from modeling.losses import mean_loss, next_token_targets, token_losses
    from modeling.tensor_parallel import tensor_parallelize

    hf = model_config(pretrained=None, arch=cfg.model.arch, config=cfg.model.config,
                      vocab_size=len(byte_level_tokenizer()))
    torch.manual_seed(0)
    model = tensor_parallelize(auto_class(hf).from_config(hf), tp_group, cfg.parallel.sequence_parallel,
                               cfg.parallel.tp_async_grad_reduce, dropout_seed=1)  # as training builds it
    recompute.apply(model, cfg.parallel.activation_checkpointing)
    lean.apply(model, cfg.parallel.lean_activations, cfg.parallel.activation_checkpointing)
    model.train()
    ids = torch.randint(0, hf.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len))
    saved = SavedActivations()
    saved.reset(model)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        targets = next_token_targets(ids)  # the loss as training computes it (chunked output layer)
        losses, output = token_losses(model, lambda: model(input_ids=ids, use_cache=False), targets,  # as training
                                      cfg.parallel.loss_chunk_tokens)
        logits, loss = output.logits, mean_loss(losses, targets)
    loss.backward()
    return sum(p.numel() for p in model.parameters()), saved.peak, logits.nbytes


def _assert_kept_is_saved_plus_logits(trace, saved: int, logits: int) -> None:
    # what stays alive after the forward is what autograd saved plus the output logits; the rest is a few
    # scalars (the loss, the token count): under 1 KB at these sizes
    assert abs(trace.kept - (saved + logits)) < 1024, (trace.kept, saved, logits)


@pytest.mark.unit
@pytest.mark.parametrize("arch, model_config, mode", [
    ("gpt2", {**TINY_GPT2, **DROPOUT}, "none"), ("gpt2", {**TINY_GPT2, **DROPOUT}, "full"),
    ("gpt2", {**TINY_GPT2, **DROPOUT}, "selective"), ("llama", TINY_LLAMA, "none"), ("qwen3", TINY_QWEN3, "none"),
    ("gemma3_text", TINY_GEMMA3, "none")])
def test_one_rank_plan_counts_the_real_models_parameters_and_saved_activations(tmp_path, arch, model_config, mode):
    cfg = _config(tmp_path, arch, model_config, activation_checkpointing=mode)
    params, saved, logits = _real_saved_bytes(cfg)
    (shape,) = plan_stages.layout_shapes(cfg)
    assert shape.params == params
    _assert_kept_is_saved_plus_logits(shape.traces[0], saved, logits)


@pytest.mark.unit
def test_recomputation_shrinks_the_planned_activations(tmp_path):
    kept = {mode: plan_stages.layout_shapes(_config(tmp_path, activation_checkpointing=mode))[0].traces[0].kept
            for mode in ("none", "selective", "full")}
    assert kept["full"] < kept["selective"] < kept["none"]


def _rank_reference(cfg_json: str):
    import torch.distributed as dist

    from parallel.groups import ProcessGroups
    from training.config import validate

    cfg = validate(json.loads(cfg_json))
    dist.init_process_group("gloo")
    groups = ProcessGroups.from_degrees(tensor=cfg.parallel.tensor)
    return _real_saved_bytes(cfg, groups.tp_group)


@pytest.mark.multiprocess
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_plan_equals_each_real_ranks_shard_and_saved_activations(tmp_path, sequence_parallel):
    cfg = _config(tmp_path, tensor=2, sequence_parallel=sequence_parallel)
    ranks = run_ranks(_rank_reference, 2, cfg.model_dump_json(), timeout=300)
    (shape,) = plan_stages.layout_shapes(cfg)
    for params, saved, logits in ranks:
        assert shape.params == params
        _assert_kept_is_saved_plus_logits(shape.traces[0], saved, logits)


@pytest.mark.unit
@pytest.mark.parametrize("arch, model_config", [("gpt2", {**TINY_GPT2, "n_layer": 4}), ("gemma3_text", TINY_GEMMA3)])
def test_pipeline_stages_hold_their_chunks_parameters(tmp_path, arch, model_config):
    cfg = _config(tmp_path, arch, model_config, pipeline=2)
    one = plan_stages.layout_shapes(_config(tmp_path, arch, model_config))[0]
    first, last = plan_stages.layout_shapes(cfg)
    # the last stage's output head is the tied embedding's copy: counted on both ends, as the run holds it
    assert first.params + last.params == one.params + first.tied
    assert first.tied == last.tied > 0
    assert len(first.traces) == len(last.traces) == 1


@pytest.mark.unit
@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_parameter_formula_counts_every_familys_weight_matrices(arch):
    """``bench.formulas.decoder_params`` of the shape read from the config (``decoder_shape``: heads, key/value
    heads, head_dim, MLP width, vocabulary, tied or not) is the model's 2-D parameters, Phi-3's fused q|k|v and
    gate|up included; what the model holds beyond it is its 1-D norm weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.formulas import decoder_params, decoder_shape

    config = AutoConfig.for_model(arch, vocab_size=260, pad_token_id=0, **FAMILIES[arch])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert decoder_params(decoder_shape(config))["total"] == matrices
    assert all(p.dim() in (1, 2) for p in model.parameters())


@pytest.mark.unit
@pytest.mark.parametrize("arch", ["qwen3", "olmo2"])
def test_tensor_parallel_plan_keeps_per_head_norms_whole_and_splits_full_width_ones(tmp_path, arch):
    """At TP=2 a rank holds half of every matrix (the 260-token vocabulary splits evenly) and the norms of the
    hidden size whole; Qwen3's q/k norms (head_dim each) whole too, OLMo 2's (over all q and k heads) halved."""
    from bench.formulas import decoder_params, decoder_shape
    from modeling.build import byte_level_tokenizer
    from training.assembly import run_model_config

    cfg = _config(tmp_path, arch, FAMILIES[arch], tensor=2)
    shape = decoder_shape(run_model_config(cfg, byte_level_tokenizer()))
    h, layers = shape.hidden, shape.layers
    qk_norms = (2 * shape.head_dim if arch == "qwen3"
                else (shape.heads + shape.kv_heads) * shape.head_dim // 2)
    expected = decoder_params(shape)["total"] // 2 + layers * (2 * h + qk_norms) + h
    (planned,) = plan_stages.layout_shapes(cfg)
    assert planned.params == expected


@pytest.mark.unit
@pytest.mark.parametrize("schedule, p, m, v, expected", [
    ("gpipe", 4, 8, 1, [8, 8, 8, 8]),
    ("1f1b", 4, 8, 1, [4, 3, 2, 1]),
    ("1f1b", 4, 2, 1, [2, 2, 2, 1]),
    # chunk micro-batches: Megatron's warm-up forwards (p - rank - 1) * 2 + (v - 1) * p, then one more
    ("interleaved", 2, 4, 2, [5, 3])])
def test_in_flight_micro_batches_follow_the_schedule(schedule, p, m, v, expected):
    traces = [plan_trace.ChunkTrace(kept=1, forward_peak=1, backward_peak=0) for _ in range(v)]
    assert [plan_stages.in_flight_peak(traces, schedule, p, m, rank, v)[0] for rank in range(p)] == expected


@pytest.mark.unit
def test_no_pipeline_holds_one_micro_batch_at_a_time():
    traces = [plan_trace.ChunkTrace(kept=10, forward_peak=12, backward_peak=5)]
    assert plan_stages.in_flight_peak(traces, "1f1b", 1, 4, 0, 1) == (10, 15)


@pytest.mark.unit
def test_search_keeps_the_layouts_that_fit_fastest_first(tmp_path, capsys):
    cfg = _config(tmp_path, model_config={**TINY_GPT2, "n_layer": 4})
    config_file = tmp_path / "run.json"
    config_file.write_text(cfg.model_dump_json())
    argv = ["--config", str(config_file), "--world-size", "4", "--set", "train.grad_accum=2"]
    everything = plan.main(argv + ["--device-memory", "1TiB"])
    assert all(r["fits"] for r in everything) and len({r["layout"] for r in everything}) >= 4
    budget = sorted(r["peak_bytes"] for r in everything)[len(everything) // 2]
    rows = plan.main(argv + ["--device-memory", str(int(budget))])
    fitting = [r for r in rows if r["fits"]]
    assert fitting and all(r["peak_bytes"] <= budget for r in fitting)
    assert all(r["peak_bytes"] > budget for r in rows if not r["fits"])
    assert rows[: len(fitting)] == fitting  # the layouts that fit come first, fastest first
    speeds = [r["tokens_per_s"] for r in fitting]
    assert speeds == sorted(speeds, reverse=True)
    assert "fit" in capsys.readouterr().out


@pytest.mark.unit
def test_parse_bytes():
    assert plan.parse_bytes("80GiB") == 80 * 2**30
    assert plan.parse_bytes("512 MB") == 512 * 10**6
    assert plan.parse_bytes("1e9") == 10**9


@pytest.mark.unit
def test_plan_within_15_percent_of_the_committed_cpu_measurements():
    """The planner against ``bench memory``'s measured peaks at the CPU sweep grid's layouts (GPT-2 124 M,
    ``bench/results/plan-grid-cpu``) and with recomputation at TP=2 + SP (``bench/results/plan-recompute-cpu``):
    the issue's bar is 15 %; on 2026-12-07 (lean activations and the chunked loss on) the errors were -12.2 % to
    +7.8 %."""
    from pathlib import Path

    checks = ["bench/results/plan-grid-cpu/results.json",
              *sorted(str(p) for p in Path("bench/results/plan-recompute-cpu").glob("tp2-sp-*/results.json"))]
    rows = plan.main([arg for check in checks for arg in ("--check", check)] + ["--device", "cpu"])
    assert len(rows) == 19
    assert all(abs(r["error"]) <= 0.15 for r in rows), [(r["run"], r["layout"], r["error"]) for r in rows]


@pytest.mark.unit
@pytest.mark.parametrize("arch", ["t5", "marian"])
def test_encoder_decoder_models_are_planned_with_their_sequence_to_sequence_loss(tmp_path, arch):
    from modeling.build import auto_class, byte_level_tokenizer
    from tests.test_seq2seq_training import MARIAN, T5_SMALL, seq2seq_config, toy_task
    from training.assembly import run_model_config

    task = toy_task(tmp_path / "task", train=8, valid=2)
    config = dict(T5_SMALL if arch == "t5" else MARIAN)
    configs = {mode: seq2seq_config(tmp_path, task, model__arch=arch, model__config=config, parallel__tensor=2,
                                    parallel__activation_checkpointing=mode) for mode in ("none", "full")}
    shapes = {mode: plan_stages.layout_shapes(cfg)[0] for mode, cfg in configs.items()}
    hf = run_model_config(configs["none"], byte_level_tokenizer())  # the run's own, special tokens included
    dense = sum(p.numel() for p in auto_class(hf).from_config(hf).parameters())
    assert dense / 2 < shapes["none"].params < dense  # split weights halved, norms and biases whole
    assert 0 < shapes["full"].traces[0].kept < shapes["none"].traces[0].kept


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["--config", "no/such.yaml"], r"bench plan: config file no/such.yaml does not exist"),
    (["--check", "no/such/results.json"], r"bench plan: .*no/such/results.json"),
    (["--config", "configs/memory_gpt2.yaml", "--layout", "tensor=5"], r"bench plan: .*parallel.tensor=5")])
def test_bad_input_is_one_line_naming_it(argv, message):
    with pytest.raises(SystemExit, match=message):
        plan.main(argv)


TINY_MIXTRAL = {**DECODER, "num_hidden_layers": 2, "num_local_experts": 4, "head_dim": 8}


@pytest.mark.unit
def test_expert_parallel_plan_holds_half_the_experts_and_partitions_them_over_their_own_ranks(tmp_path):
    """At EP=2 a rank holds every dense parameter and half of every expert tensor (the run's own
    ``expert_parallelize`` under the fake world), traced through the expert-parallel forward on the meta device;
    the model state partitions the experts over data / expert ranks, the rest over data."""
    from bench.formulas import expert_layout_state_bytes, model_state_bytes
    from modeling.experts import experts_modules

    one = plan_stages.layout_shapes(_config(tmp_path, "mixtral", TINY_MIXTRAL))[0]
    cfg = _config(tmp_path, "mixtral", TINY_MIXTRAL, expert=2)
    (planned,) = plan_stages.layout_shapes(cfg)
    model = plan_stages.full_meta_model(cfg)
    experts = sum(p.numel() for m in experts_modules(model).values() for p in m.parameters())
    assert planned.expert_params == experts // 2 and planned.params == one.params - experts // 2
    assert planned.traces[0].kept > 0
    state = expert_layout_state_bytes(planned.params, 1, 4, 0, "fp32", planned.expert_params, 2)
    dense, expert = model_state_bytes(one.params - experts, 1, 4), model_state_bytes(experts // 2, 1, 2)
    assert state == {key: dense[key] + expert[key] for key in dense}
    assert plan_stages.stage_memory(planned, cfg, 4, 1, 2).model_state == state
    from modeling.experts import active_parameters  # a token's parameters: the dense ones and top-2 of 4 experts

    assert active_parameters(model) == sum(p.numel() for p in model.parameters()) - experts + experts * 2 // 4


@pytest.mark.unit
def test_search_ranks_expert_parallel_layouts_of_a_moe_model(tmp_path, capsys):
    """A mixture-of-experts model's search adds every expert degree the data-parallel ranks and the experts
    allow (ZeRO 1/2), with the all-to-all priced; an expert-parallel layout holds less than the same layout
    without it."""
    cfg = _config(tmp_path, "mixtral", TINY_MIXTRAL)
    config_file = tmp_path / "run.json"
    config_file.write_text(cfg.model_dump_json())
    rows = plan.main(["--config", str(config_file), "--world-size", "4", "--set", "train.grad_accum=2",
                      "--device-memory", "1TiB"])
    by_layout = {(r["layout"], r["zero"]): r for r in rows}
    assert {"tensor=1,pipeline=1,data=4,expert=2", "tensor=1,pipeline=1,data=4,expert=4"} <= {r["layout"]
                                                                                              for r in rows}
    assert not [r for r in rows if "expert" in r["layout"] and r["zero"] in (0, 3)]
    split, whole = by_layout[("tensor=1,pipeline=1,data=4,expert=4", 1)], by_layout[("tensor=1,pipeline=1,data=4", 1)]
    assert split["ep_s"] > 0 == whole["ep_s"] and split["peak_bytes"] < whole["peak_bytes"]
    assert "EP comm s" in capsys.readouterr().out
