"""Expert parallelism (``parallel.expert``, ``modeling.experts``, ``parallel.experts``) on mixture-of-experts
models built by transformers, in real training runs against an independent single-process reference: plain
transformers + torch AdamW, the model's own loss (its cross-entropy plus ``router_aux_loss_coef`` x its
load-balancing loss when ``output_router_logits``), one forward per micro-batch of the global batch as HF
Trainer runs gradient accumulation (the load-balancing loss is a function of a forward's tokens, so the
micro-batches must be the ones colonnade forms: consecutive runs of ``micro_batch_size`` blocks of the step's
global batch, ``training.data.BatchPlan``).

The tiny configs keep what makes each family different: Mixtral's softmax top-2 router renormalised, with its
load-balancing loss weighted so that it matters; Qwen3-MoE with a dense first layer (``mlp_only_layers``), q/k
norms and its load-balancing loss; DeepSeek-V3 with multi-head latent attention, a dense first layer, a shared
expert, sigmoid group-limited routing with a scaling factor.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_ranks
from tests.helpers import (
    assert_exports_agree,
    assert_matches_reference,
    assert_resumes_continue,
    reference_blocks,
    reference_model,
    reference_order,
    reference_training,
    relative_error,
    run_configs,
    step_records,
    tiny_config,
    write_corpus,
)

# fp32: only the summation order differs from the reference (the all-to-all changes no value; an expert's
# weight gradient sums its tokens from both ranks in another order, the DP average of micro-batch means, the TP
# all-reduces). AdamW's eps is 1e-6 rather than torch's 1e-8: an expert that few tokens reach has gradient
# components near zero, where Adam's update g / (sqrt(v) + eps) turns rounding noise into O(lr) steps. Measured
# on the 2-core box (2026-12-06), Qwen3-MoE, 10 steps, worst step, relative: eps 1e-8 grad norm 4.2e-6 at EP=1
# x DP=2 and 2.3e-5 at EP=2; eps 1e-6 1.4e-7 at both. Worst of all layouts below: see the test docstrings.
LOSS_TOL = 1e-5
NORM_TOL = 1e-5
EPS = 1e-6

_ATTENTION = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64)
FAMILIES = {
    "mixtral": dict(_ATTENTION, intermediate_size=48, num_local_experts=4, output_router_logits=True,
                    router_aux_loss_coef=0.1),
    "qwen3_moe": dict(_ATTENTION, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0], output_router_logits=True,
                      router_aux_loss_coef=0.1),
    "deepseek_v3": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64),
}
MICRO = 2


def _config(tmp, corpus, arch: str, steps: int = 10, router_loss: bool = True, **overrides):
    settings = dict(train__steps=steps, train__grad_accum=2, parallel__zero_stage=1, optim__eps=EPS)
    settings.update(overrides)
    config = FAMILIES[arch] if router_loss else {**FAMILIES[arch], "output_router_logits": False}
    return tiny_config(tmp / arch, corpus, model={"arch": arch, "tokenizer": "byte", "config": config}, **settings)


def reference_first_step_load(cfg, global_batch: int) -> dict[str, torch.Tensor]:
    """Tokens per expert of each MoE layer (``layer_<i>``) over the first step's global batch, counted from the
    experts each HF router chose (every layer's experts module called with the router's choice)."""
    model = reference_model(cfg)
    blocks = reference_blocks(cfg.data.train_files, cfg.data.seq_len)
    ids = blocks[reference_order(len(blocks), cfg.train.seed, global_batch)]
    counts: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Experts"):
            layer = "layer_" + name.split(".")[2]
            module.register_forward_pre_hook(lambda m, args, layer=layer: counts.__setitem__(
                layer, counts.get(layer, 0) + torch.bincount(args[1].reshape(-1), minlength=m.num_experts)))
    with torch.no_grad():
        model(input_ids=ids)
    return counts


def reference_moe_training(cfg, global_batch: int) -> tuple[list[float], list[float], torch.nn.Module]:
    """The reference run with one forward per micro-batch (``tests.helpers.reference_training``)."""
    return reference_training(cfg, global_batch, micro_batch=cfg.train.micro_batch_size)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("experts") / "corpus")


def _check(name: str, history: list[dict], ref: tuple[list[float], list[float]]):
    assert_matches_reference(name, history, ref, LOSS_TOL, NORM_TOL)


@pytest.mark.multiprocess
def test_expert_parallel_2_matches_single_process(tmp_path, corpus):
    """EP=2 (= DP=2), ZeRO-1 and ZeRO-2, 10 steps of each family, one launch of 2 ranks."""
    cfgs = [_config(tmp_path / f"zero{zero}", corpus, arch, parallel__expert=2, parallel__zero_stage=zero)
            for arch in FAMILIES for zero in (1, 2)]
    histories = run_ranks(run_configs, 2, cfgs, timeout=900)[0]
    references = {}
    for cfg, history in zip(cfgs, histories):
        arch = cfg.model.arch
        if arch not in references:
            references[arch] = reference_moe_training(cfg, global_batch=MICRO * 2 * 2)[:2]
            assert max(references[arch][1]) > cfg.optim.grad_clip, f"{arch}: clipping must be active"
        _check(f"{arch} EP2 ZeRO-{cfg.parallel.zero_stage}", history, references[arch])
        _check_expert_load(cfg, step_records(history)[0])


def _check_expert_load(cfg, first_step: dict) -> None:
    """The step's tokens per expert, as logged (``training.expert_load``), are the reference router's counts."""
    loads = reference_first_step_load(cfg, global_batch=MICRO * 2 * 2)
    logged = {key.split("/")[1] for key in first_step if key.startswith("moe/")}
    assert logged == set(loads) and len(loads) == (4 if cfg.model.arch == "mixtral" else 3)  # others: a dense first
    for layer, counts in loads.items():
        counts = counts.double()
        assert first_step[f"moe/{layer}/tokens_min"] == float(counts.min()), layer
        assert first_step[f"moe/{layer}/tokens_max"] == float(counts.max()), layer
        cv = float(counts.std(unbiased=False) / counts.mean())
        assert first_step[f"moe/{layer}/tokens_cv"] == pytest.approx(cv, rel=1e-12), layer


@pytest.fixture(scope="module")
def reference():
    """The reference's (losses, grad norms) per family, load-balancing setting and micro-batch size (the
    load-balancing loss is one per micro-batch), computed once."""
    cache: dict[tuple, tuple[list[float], list[float]]] = {}

    def of(cfg):
        key = (cfg.model.arch, cfg.model.config.get("output_router_logits", False), cfg.train.micro_batch_size)
        if key not in cache:
            cache[key] = reference_moe_training(cfg, global_batch=MICRO * 2 * 2)[:2]
            assert max(cache[key][1]) > cfg.optim.grad_clip, f"{key}: clipping must be active"
        return cache[key]

    return of


@pytest.mark.multiprocess
@pytest.mark.slow
def test_expert_parallel_with_tensor_and_pipeline_parallelism(tmp_path, corpus, reference):
    """EP=2 x TP=2 (experts whole per tensor rank, attention split), EP=2 x TP=2 with sequence parallelism (the
    load-balancing loss's totals summed over the sequence shards) and EP=2 x PP=2 (1F1B; the totals carried
    between the stages), 10 steps of each family, one launch of 4 ranks."""
    cfgs = []
    for arch in FAMILIES:
        cfgs.append(_config(tmp_path / "tp", corpus, arch, parallel__expert=2, parallel__tensor=2))
        cfgs.append(_config(tmp_path / "sp", corpus, arch, parallel__expert=2, parallel__tensor=2,
                            parallel__sequence_parallel=True))
        cfgs.append(_config(tmp_path / "pp", corpus, arch, parallel__expert=2, parallel__pipeline=2))
    histories = run_ranks(run_configs, 4, cfgs, timeout=900)[0]
    for cfg, history in zip(cfgs, histories):
        par = cfg.parallel
        _check(f"{cfg.model.arch} EP2 TP{par.tensor}{'+SP' if par.sequence_parallel else ''} PP{par.pipeline}",
               history, reference(cfg))
        _check_expert_load(cfg, step_records(history)[0])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_expert_parallel_checkpoint_resumes_at_other_layouts_and_exports(tmp_path, corpus):
    """Mixtral and DeepSeek-V3 at EP=2 x TP=2 for 10 steps (checkpoint at step 5, export at the end) equal the
    reference; the step-5 checkpoint resumes at EP=2 x PP=2 (4 ranks) and on one process (EP=1), each rank
    reading only the experts it holds, to the uninterrupted run's steps 6-10; the export (experts gathered over
    the expert-parallel group) reloads with ``from_pretrained`` to the reference model's logits and agrees with
    the one-process resume's."""
    from transformers import AutoModelForCausalLM

    archs = ("mixtral", "deepseek_v3")
    step5 = "run/checkpoints/step_0000005"
    first = [_config(tmp_path / "ep2tp2", corpus, arch, router_loss=False, parallel__expert=2, parallel__tensor=2,
                     train__save_every=5, train__export_hf=True) for arch in archs]
    pipelined = [_config(tmp_path / "ep2pp2", corpus, arch, router_loss=False, parallel__expert=2,
                         parallel__pipeline=2, train__resume=str(tmp_path / "ep2tp2" / arch / step5)) for arch in archs]
    alone = [_config(tmp_path / "one", corpus, arch, router_loss=False, train__grad_accum=4, train__export_hf=True,
                     train__resume=str(tmp_path / "ep2tp2" / arch / step5)) for arch in archs]
    histories = run_ranks(run_configs, 4, first, timeout=900)[0]
    resumed_pp = run_ranks(run_configs, 4, pipelined, timeout=900)[0]
    resumed_one = run_ranks(run_configs, 1, alone, timeout=900)[0]
    probe = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    for index, arch in enumerate(archs):
        losses, norms, model = reference_moe_training(first[index], global_batch=MICRO * 2 * 2)
        _check(f"{arch} EP2 TP2 10 steps", histories[index], (losses, norms))
        assert_resumes_continue(histories[index], [resumed_pp[index], resumed_one[index]])
        run = tmp_path / "ep2tp2" / arch / "run"
        assert_exports_agree(run, tmp_path / "one" / arch / "run")
        exported = AutoModelForCausalLM.from_pretrained(run / "hf")
        with torch.no_grad():
            got, expected = exported(input_ids=probe).logits, model(input_ids=probe).logits
        print(f"{arch} export vs reference logits: {float((got - expected).abs().max()):.1e} max abs")
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=lambda m, arch=arch: f"{arch}: {m}")


def _mutated(cfgs):
    """Rank function: ``run_configs(cfgs[0])`` with each token-expert pair sent to the next rank's expert of the
    same local index (a wrong rank), ``cfgs[1]`` with the router's combine weights dropped (every chosen expert
    weighted 1), ``cfgs[2]`` with the load-balancing totals of the sequence shards not summed (each rank's loss
    from its own routers' part only)."""
    import modeling.experts
    import parallel.experts

    plan = parallel.experts.plan_dispatch

    def wrong_rank(expert_index, num_experts, group):
        return plan((expert_index + num_experts // 2) % num_experts, num_experts, group)

    parallel.experts.plan_dispatch = wrong_rank
    wrong = run_configs(cfgs[:1])
    parallel.experts.plan_dispatch = plan
    combine = parallel.experts.expert_parallel

    def unweighted(hidden, top_k_index, top_k_weights, num_experts, group, compute):
        return combine(hidden, top_k_index, torch.ones_like(top_k_weights), num_experts, group, compute)

    modeling.experts.expert_parallel = unweighted
    unweighted_run = run_configs(cfgs[1:2])
    modeling.experts.expert_parallel = combine
    modeling.experts.reduce_from_tensor_parallel_region = lambda totals, group: totals
    return wrong + unweighted_run + run_configs(cfgs[2:])


@pytest.mark.multiprocess
def test_a_wrong_rank_or_dropped_combine_weights_fail_it(tmp_path, corpus, reference):
    """The negative control of the parity checks: Mixtral with its pairs dispatched to the wrong rank, with the
    router's weights left out of the combine (EP=2), and at TP=2 + SP with its load-balancing loss taken from
    each rank's part of the sequence alone, each misses the reference by far more than the tolerance (the
    correct runs: test_expert_parallel_2_matches_single_process, the EP=2 x TP=2 + SP one)."""
    cfgs = [_config(tmp_path / name, corpus, "mixtral", parallel__expert=2) for name in ("rank", "weights")]
    cfgs.append(_config(tmp_path / "shards", corpus, "mixtral", parallel__tensor=2, parallel__sequence_parallel=True,
                        train__grad_accum=4))  # the same global batch of 8 on one data-parallel rank
    histories = run_ranks(_mutated, 2, cfgs, timeout=600)[0]
    ref_loss, ref_norm = reference(cfgs[0])
    for cfg, history in zip(cfgs, histories):
        first = step_records(history)[0]
        loss_off, norm_off = abs(first["loss"] / ref_loss[0] - 1), abs(first["grad_norm"] / ref_norm[0] - 1)
        print(f"{cfg.train.output_dir}: step 1 loss {loss_off:.1e}, grad norm {norm_off:.1e} off")
        # measured: wrong rank 1.5e-4 / 7.6e-3, no combine weights 1.7e-4 / 3.7e-3, sequence-local loss 2.6e-2 /
        # 3.1e-4 (random experts move a fresh loss little; the load-balancing term is a small part of the norm)
        assert loss_off > 10 * LOSS_TOL and norm_off > 10 * NORM_TOL


@pytest.mark.multiprocess
@pytest.mark.slow
def test_expert_parallel_with_every_schedule_and_recomputation(tmp_path, corpus, reference):
    """Qwen3-MoE (a dense first layer, q/k norms, its load-balancing loss) at EP=2 x PP=2 under GPipe,
    interleaved 1F1B (one layer per chunk: the loss's totals pass through every chunk) and ZB-H1 (weight
    gradients deferred), and at EP=2 x DP=2 with full and selective recomputation (the dispatch recomputed in
    the backward), one launch of 4 ranks: equal to the reference for 10 steps. The load-balancing loss matters
    here: the reference without it is far from the one with it."""
    pipelines = [dict(parallel__schedule="gpipe"), dict(parallel__schedule="interleaved", parallel__virtual_stages=2),
                 dict(parallel__schedule="zb-h1")]
    cfgs = [_config(tmp_path / f"pp{index}", corpus, "qwen3_moe", parallel__expert=2, parallel__pipeline=2,
                    **schedule) for index, schedule in enumerate(pipelines)]
    cfgs += [_config(tmp_path / mode, corpus, "qwen3_moe", parallel__expert=2, train__micro_batch_size=1,
                     train__grad_accum=2, parallel__activation_checkpointing=mode) for mode in ("full", "selective")]
    histories = run_ranks(run_configs, 4, cfgs, timeout=900)[0]
    for cfg, history in zip(cfgs, histories):
        par = cfg.parallel
        _check(f"qwen3_moe EP2 PP{par.pipeline} {par.schedule} recompute {par.activation_checkpointing}", history,
               reference(cfg))
    without = reference(_config(tmp_path / "plain", corpus, "qwen3_moe", router_loss=False))
    off = relative_error(without[1], reference(cfgs[0])[1])
    print(f"qwen3_moe reference without its load-balancing loss: grad norm {off:.1e} relative off")
    assert off > 100 * NORM_TOL


def _wandb_logged(cfg):
    """Rank function: train with W&B offline; the records given to the W&B run's ``log``."""
    import wandb

    logged: list[dict] = []
    original = wandb.init

    def recording_init(**kwargs):
        run = original(**kwargs)
        log = run.log

        def recording_log(data, *args, **more):
            logged.append(dict(data))
            return log(data, *args, **more)

        run.log = recording_log
        return run

    wandb.init = recording_init
    from training import run

    run(cfg)
    return logged


@pytest.mark.multiprocess
@pytest.mark.slow
def test_moe_quickstart_logs_tokens_per_expert_to_metrics_and_wandb(tmp_path):
    """configs/moe_quickstart.yaml (its model, tokenizer, data and EP=2 layout; 3 steps here) writes each MoE
    layer's tokens per expert into metrics.jsonl and the offline W&B run, every step."""
    import json
    from pathlib import Path

    from training.config import load

    root = Path(__file__).resolve().parents[1]
    cfg = load(root / "configs/moe_quickstart.yaml", [f"train.output_dir={tmp_path / 'run'}", "train.steps=3",
                                                      "optim.warmup_steps=0", "train.eval_every=0",
                                                      "train.save_final=false", "train.log_every=1"])
    logged = run_ranks(_wandb_logged, 2, cfg, timeout=600)[0]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in metrics if "loss" in r]
    keys = {f"moe/layer_{i}/tokens_{s}" for i in range(4) for s in ("min", "max", "cv")}
    assert len(steps) == 3 and all(keys <= r.keys() for r in steps)
    in_wandb = [r for r in logged if "loss" in r]
    assert len(in_wandb) == 3 and all(keys <= r.keys() for r in in_wandb)
    for record in steps:  # the step's tokens: 2 ranks x 8 sequences x 128 tokens, each routed to its top 2
        assert 0 <= record["moe/layer_0/tokens_min"] <= 2 * 8 * 128 * 2 / 8 <= record["moe/layer_0/tokens_max"]


@pytest.mark.unit
def test_a_load_balancing_loss_colonnade_cannot_split_is_refused_by_name():
    """Mixtral's load-balancing loss (transformers' standard one) splits over stages and sequence shards, in fp32
    pipelines; Doge's own kind of loss is refused split either way, one line naming the keys; without a split
    both run as the model computes it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from modeling.experts import check_router_loss_fits

    def meta(model_type, **fields):
        config = AutoConfig.for_model(model_type, output_router_logits=True, **fields)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)

    mixtral = meta("mixtral", **_ATTENTION, intermediate_size=48, num_local_experts=4)
    doge = meta("doge", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64)
    for model in (mixtral, doge):
        check_router_loss_fits(model, 1, False, "bf16")
    check_router_loss_fits(mixtral, 2, True, "fp32")
    with pytest.raises(ValueError, match="parallel.pipeline=2 and precision=bf16: .*exact only in fp32"):
        check_router_loss_fits(mixtral, 2, False, "bf16")
    for pipeline, sequence_parallel, named in ((2, False, "parallel.pipeline=2"),
                                               (1, True, "parallel.sequence_parallel=true")):
        with pytest.raises(ValueError, match=f"output_router_logits=true with {named}: model_type 'doge'"):
            check_router_loss_fits(doge, pipeline, sequence_parallel, "fp32")
