"""bench diverge names the module where a layout parts from one process, for planted bugs, and reports
correct layouts equal."""

from __future__ import annotations

import contextlib

import pytest

from tests.dist import run_ranks
from tests.helpers import TINY_GPT2, tiny_config, write_corpus

FOUR_LAYERS = dict(TINY_GPT2, n_layer=4, n_head=4)
# Gemma 3 (text): per-head q/k norms kept whole under TP (their gradients summed over the tensor group), one sliding
# and one full attention layer, the rotary embedding called once per layer type
TINY_GEMMA3 = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 8, "max_position_embeddings": 64,
               "layer_types": ["sliding_attention", "full_attention"]}


@contextlib.contextmanager
def _planted(bug: str | None):
    """One bug in colonnade, for the duration of a capture."""
    import modeling.pipeline_partition as pipeline
    import modeling.tensor_parallel as tp_plan
    import training.assembly as assembly
    from parallel.partition import StageSpec

    saved = {"build": assembly.build_engine, "enter": tp_plan._enter_region_at_input, "specs": pipeline.stage_specs,
             "sum": tp_plan._sum_partial_grads}
    if bug == "scaled shard":  # tensor rank 1's half of block 1's MLP input weight 1 % too large
        def build(cfg, model, pipe, ds_config, groups, *args):
            if groups.tp_rank == 1:
                model.transformer.h[1].mlp.c_fc.weight.data.mul_(1.01)
            return saved["build"](cfg, model, pipe, ds_config, groups, *args)
        assembly.build_engine = build
    elif bug == "no backward all-reduce":  # block 1's MLP enters the region without its backward all-reduce
        mlps = []

        def enter(module, *args):
            if type(module).__name__ == "GPT2MLP":
                mlps.append(module)
                if len(mlps) == 2:
                    return None
            return saved["enter"](module, *args)
        tp_plan._enter_region_at_input = enter
    elif bug == "stage boundary":  # the second stage starts one block late: block 2 never runs
        def specs(*args):
            first, second = saved["specs"](*args)
            return [first, StageSpec(range(second.blocks.start + 1, second.blocks.stop), head=second.head)]
        pipeline.stage_specs = specs
    elif bug == "unsummed q_norm gradient":  # block 1's per-head q norm: its gradient not summed over the group
        def sum_partial(model, *args):
            weight = model.model.layers[1].self_attn.q_norm.weight
            weight.tensor_model_parallel = True  # what _sum_partial_grads skips
            saved["sum"](model, *args)
            del weight.tensor_model_parallel
        tp_plan._sum_partial_grads = sum_partial
    try:
        yield
    finally:
        (assembly.build_engine, tp_plan._enter_region_at_input, pipeline.stage_specs,
         tp_plan._sum_partial_grads) = saved.values()


def _captures(jobs):
    """Rank function: ``bench.diverge.capture`` of each (config, output directory, planted bug) in turn."""
    from bench.diverge import capture

    for cfg, out, bug in jobs:
        with _planted(bug):
            capture(cfg, out)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_diverge_names_the_module_of_each_planted_bug_and_equal_layouts_equal(tmp_path):
    from bench.diverge import compare, report

    corpus = write_corpus(tmp_path / "corpus")

    def config(name, **layout):
        return tiny_config(tmp_path / name, corpus, model__config=FOUR_LAYERS, train__steps=1, train__grad_accum=2,
                           optim__warmup_steps=0, train__save_final=False,
                           parallel__zero_stage=1, **layout)

    single = tmp_path / "single"
    run_ranks(_captures, 1, [(config("one"), single, None)], timeout=300)
    jobs = {"tp2": (config("tp2", parallel__tensor=2), None),
            "scaled shard": (config("tp2s", parallel__tensor=2), "scaled shard"),
            "no backward all-reduce": (config("tp2r", parallel__tensor=2), "no backward all-reduce"),
            "pp2": (config("pp2", parallel__pipeline=2), None),
            "stage boundary": (config("pp2b", parallel__pipeline=2), "stage boundary")}
    run_ranks(_captures, 2, [(cfg, tmp_path / name, bug) for name, (cfg, bug) in jobs.items()], timeout=600)
    results = {name: compare(tmp_path / name, single, tol=1e-4) for name in jobs}

    assert results["tp2"]["first"] is None, report(results["tp2"], "TP=2", "one process")
    assert results["pp2"]["first"] is None, report(results["pp2"], "PP=2", "one process")
    kind, module, (status, _) = results["scaled shard"]["first"]
    assert (kind, module, status) == ("forward output", "transformer.h.1.mlp.c_fc", "differs")
    kind, module, (status, _) = results["no backward all-reduce"]["first"]
    assert (kind, module, status) == ("input gradient", "transformer.h.1.mlp", "differs")
    kind, module, (status, _) = results["stage boundary"]["first"]
    assert (kind, module, status) == ("forward output", "transformer.h.2.ln_1", "missing")  # block 2's first


@pytest.mark.multiprocess
def test_gemma3_at_tp2_differs_from_one_process_only_by_an_unsummed_q_norm_gradient(tmp_path):
    """A declared-plan family: Gemma 3 at TP=2 without the gradient sum of block 1's per-head q norm. That
    parameter's gradient is named; every module output and input gradient (the q/k norms compared head by head,
    the rotary embedding's calls by layer type) and every other parameter equals one process."""
    from bench.diverge import compare

    corpus = write_corpus(tmp_path / "corpus")

    def config(name, **layout):
        return tiny_config(tmp_path / name, corpus, model={"arch": "gemma3_text", "tokenizer": "byte",
                                                           "config": TINY_GEMMA3},
                           train__steps=1, train__grad_accum=2, optim__warmup_steps=0, train__save_final=False,
                           parallel__zero_stage=1, **layout)

    run_ranks(_captures, 1, [(config("one"), tmp_path / "single", None)], timeout=300)
    run_ranks(_captures, 2, [(config("tp2", parallel__tensor=2), tmp_path / "tp2", "unsummed q_norm gradient")],
              timeout=300)
    result = compare(tmp_path / "tp2", tmp_path / "single", tol=1e-4)

    planted = "model.layers.1.self_attn.q_norm.weight"
    kind, name, (status, _) = result["first"]
    assert (kind, name, status) == ("parameter gradient", planted, "differs")
    rows = {r["module"]: r for r in result["modules"]}
    assert {"model.rotary_emb[sliding_attention]", "model.rotary_emb[full_attention]"} <= set(rows)
    assert rows["model.layers.1.self_attn.q_norm"]["outputs"][0] == "equal"
    assert all(r[kind][0] in ("equal", "not captured", "not comparable") for r in result["modules"]
               for kind in ("outputs", "input_grads"))
    assert all(p["grads"][0] == p["params"][0] == "equal" for p in result["params"] if p["parameter"] != planted)


@pytest.mark.unit
def test_bad_input_is_one_line(tmp_path):
    import pytest

    from bench.diverge import main

    corpus = write_corpus(tmp_path / "corpus")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{arch: gpt2, tokenizer: byte, config: {{n_layer: 2, n_head: 2, n_embd: 32}}}}\n"
                      f"data: {{train_files: ['{corpus}/part0.txt'], seq_len: 32}}\n"
                      f"train: {{micro_batch_size: 2, grad_accum: 2, output_dir: {tmp_path / 'run'}}}\n")
    with pytest.raises(SystemExit, match="'foo=3' is not one of tensor=N") as exited:
        main(["--config", str(config), "--layout", "tensor=2,foo=3", "--out", str(tmp_path / "o")])
    assert exited.value.code == 2  # bad input, as train.py (before: 1)
    with pytest.raises(SystemExit, match="data=3 divides neither train.grad_accum=2"):
        main(["--config", str(config), "--layout", "data=3", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="bench diverge: .*nope.yaml"):
        main(["--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")])


@pytest.mark.unit
def test_dropout_fields_are_found_by_name_in_any_architecture():
    """Every dropout probability of GPT-2, Llama, T5 and Marian configs goes to 0, whatever its name; the built
    models then hold no dropout with p > 0. Before: diverge compared with dropout on (TP=2 + SP of the quickstart
    reported transformer.h.0.attn.c_proj, 0.561; its per-rank masks differ from one process by design)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from bench.diverge import dropout_fields, without_dropout

    small = {"gpt2": dict(n_layer=1, n_head=2, n_embd=16),
             "llama": dict(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32,
                           attention_dropout=0.1),
             "t5": dict(num_layers=1, num_heads=2, d_model=16, d_kv=8, d_ff=32),
             "marian": dict(encoder_layers=1, decoder_layers=1, d_model=16, encoder_attention_heads=2,
                            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=0.1,
                            attention_dropout=0.1, activation_dropout=0.1, encoder_layerdrop=0.1, pad_token_id=0,
                            decoder_start_token_id=0, eos_token_id=1)}
    expected = {"gpt2": {"attn_pdrop", "embd_pdrop", "resid_pdrop"}, "llama": {"attention_dropout"},
                "t5": {"dropout_rate"}, "marian": {"dropout", "attention_dropout", "activation_dropout",
                                                  "encoder_layerdrop"}}
    for arch, fields in small.items():
        config = AutoConfig.for_model(arch, vocab_size=64, **fields)
        found = {k for k, v in dropout_fields(config).items() if v}
        assert expected[arch] <= found, (arch, found)
        without_dropout(config)
        assert not any(dropout_fields(config).values()), arch
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_config(config)
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout)), arch


@pytest.mark.unit
def test_report_says_what_it_did_with_dropout(tmp_path, monkeypatch, capsys):
    """By default both layouts' workers build the model without dropout and the report's second line lists the
    probabilities set to 0; ``--keep-dropout`` passes to the workers and the report says the comparison includes
    dropout. (The launches and the comparison are stubbed: what is checked is what main passes and prints.)"""
    import subprocess

    import pytest

    import bench.diverge as diverge
    import bench.launch as launch

    corpus = write_corpus(tmp_path / "corpus")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{arch: gpt2, tokenizer: byte, config: {{n_layer: 2, n_head: 2, n_embd: 32}}}}\n"
                      f"data: {{train_files: ['{corpus}/part0.txt'], seq_len: 32}}\n"
                      f"train: {{micro_batch_size: 2, grad_accum: 2, output_dir: {tmp_path / 'run'}}}\n")
    workers = []
    monkeypatch.setattr(launch, "torchrun", lambda module, nproc, args, **kw: workers.append(args) or
                        subprocess.CompletedProcess(args, 0, "", ""))
    monkeypatch.setattr(diverge, "compare", lambda a, b, tol: {"first": None, "modules": [], "params": [], "tol": tol})
    base = ["--config", str(config), "--layout", "tensor=2,parallel.sequence_parallel=true",
            "--out", str(tmp_path / "o")]
    for extra, flag_passed, said in (([], False, "dropout: off in both layouts (attn_pdrop=0.1, embd_pdrop=0.1, "
                                       "resid_pdrop=0.1, summary_first_dropout=0.1 set to 0)"),
                                     (["--keep-dropout"], True, "the comparison includes dropout, whose masks differ "
                                      "by design under tensor parallelism")):
        workers.clear()
        with pytest.raises(SystemExit) as exited:
            diverge.main(base + extra)
        assert exited.value.code == 0
        assert [("--keep-dropout" in args) for args in workers] == [flag_passed, flag_passed]
        assert said in capsys.readouterr().out.splitlines()[1]
