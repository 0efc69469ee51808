"""A user's DeepSpeed JSON (``--deepspeed_config``): HF-Trainer-style "auto" values, precision taken from the
YAML when the JSON is silent, ZeRO offload with colonnade's optimizer, and messages that name the values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist import run_ranks
from tests.helpers import tiny_config, write_corpus
from training.config import ConfigError, validate
from training.deepspeed_config import check_user_deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"arch": "gpt2"}, "data": {"train_files": ["x.txt"], "seq_len": 8}}

HF_STYLE = {  # what HF Trainer users bring: everything colonnade decides left to "auto"
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", "loss_scale": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": "auto", "overlap_comm": True, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto"},
}


def _cfg(**sections):
    return validate({**MINIMAL, "train": {"steps": 5, "micro_batch_size": 2, "grad_accum": 2}, **sections})


@pytest.mark.unit
def test_auto_values_take_colonnade_values():
    cfg = _cfg(parallel={"zero_stage": 2}, precision="bf16", optim={"lr": 1e-4, "grad_clip": 0.5})
    merged = check_user_deepspeed_config(HF_STYLE, cfg, 2)
    assert (merged["train_batch_size"], merged["train_micro_batch_size_per_gpu"],
            merged["gradient_accumulation_steps"]) == (8, 2, 2)
    assert merged["gradient_clipping"] == 0.5 and merged["zero_optimization"]["stage"] == 2
    assert merged["zero_optimization"]["overlap_comm"] is True
    assert "reduce_bucket_size" not in merged["zero_optimization"]  # DeepSpeed's default
    assert merged["bf16"]["enabled"] is True and merged["fp16"]["enabled"] is False
    assert "optimizer" not in merged and "scheduler" not in merged  # built by colonnade from optim.*
    with pytest.raises(ConfigError, match=r'zero_optimization.sub_group_size="auto": colonnade has no value'):
        check_user_deepspeed_config({"zero_optimization": {"sub_group_size": "auto"}}, cfg, 2)


@pytest.mark.unit
def test_precision_comes_from_the_yaml_when_the_json_is_silent():
    """Before: a JSON without a bf16 section trained in fp32 while config.yaml said bf16."""
    merged = check_user_deepspeed_config({"zero_optimization": {"stage": 1}}, _cfg(precision="bf16",
                                                                                  parallel={"zero_stage": 1}), 2)
    assert merged["bf16"]["enabled"] is True and merged["fp16"]["enabled"] is False
    with pytest.raises(ConfigError) as err:  # before: "bf16.enabled=True (DeepSpeed JSON) vs precision=False"
        check_user_deepspeed_config({"bf16": {"enabled": True}}, _cfg(), 2)
    assert "bf16.enabled=True (DeepSpeed JSON) vs precision='fp32' (YAML)" in str(err.value)


@pytest.mark.unit
def test_the_zero_stage_is_the_yaml_s_whatever_the_json_says():
    """One source for the ZeRO stage: the JSON's is parallel.zero_stage (filled when absent or "auto", the same
    number when it agrees), so the engine's zero_optimization_stage() is the config's."""
    cfg = _cfg(parallel={"zero_stage": 2})
    for zero in ({}, {"stage": "auto"}, {"stage": 2}, {"stage": 2.0}):
        stage = check_user_deepspeed_config({"zero_optimization": zero}, cfg, 2)["zero_optimization"]["stage"]
        assert stage == 2 and type(stage) is int, zero
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=3 \(DeepSpeed JSON\) vs parallel.zero_stage=2"):
        check_user_deepspeed_config({"zero_optimization": {"stage": 3}}, cfg, 2)


@pytest.mark.unit
def test_a_scheduler_the_run_would_ignore_is_refused():
    with pytest.raises(ConfigError, match=r"scheduler.params=.* would not be used: colonnade builds the warm-up"):
        check_user_deepspeed_config({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}},
                                    _cfg(), 2)


@pytest.mark.subprocess
def test_print_config_with_an_hf_style_json(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(HF_STYLE))
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/quickstart.yaml", "--print-config",
                          "--deepspeed_config", str(ds)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert json.loads(out.stdout.partition("# DeepSpeed JSON (world size 1)\n")[2])["train_batch_size"] == 8


def _train(cases):
    from training import run

    out = []
    for cfg, ds_file in cases:
        result = run(cfg, ds_file)
        out.append((result.losses, str(next(result.engine.module.parameters()).dtype)))
    return out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bf16_and_offload_from_a_user_json_train_what_was_asked(tmp_path):
    """bf16 in the YAML with a JSON that has no bf16 section trains in bf16; ZeRO-2 with optimizer offload in the
    JSON (DeepSpeed refuses a client optimizer there unless told) trains to ZeRO-2's losses and saves."""
    corpus = write_corpus(tmp_path / "corpus")
    plain, offload = tmp_path / "plain.json", tmp_path / "offload.json"
    plain.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    offload.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    cases = [(tiny_config(tmp_path / n, corpus, train__steps=3, parallel__zero_stage=z, precision=p), f)
             for n, z, p, f in (("fp32", 1, "fp32", str(plain)), ("bf16", 1, "bf16", str(plain)),
                                ("zero2", 2, "fp32", None), ("offload", 2, "fp32", str(offload)))]
    (fp32, fp32_dtype), (bf16, bf16_dtype), (zero2, _), (offloaded, _) = run_ranks(_train, 1, cases, timeout=600)[0]
    assert fp32_dtype == "torch.float32" and bf16_dtype == "torch.bfloat16"
    assert bf16 != fp32, "bf16 trained exactly like fp32"
    # The same torch AdamW on the same fp32 partitions, stepped on the CPU either way. The gradient norm that
    # clipping divides by (active on every step here) is summed in another order over the offloaded partition: it
    # differs in the last bits (2.8785880 vs 2.8785875 at step 1), so the losses agree to fp32 rounding, not bit for
    # bit (on a GPU ZeRO-2 alone would also step on the device).
    assert offloaded == pytest.approx(zero2, rel=1e-6)
    assert (tmp_path / "offload" / "run" / "checkpoints" / "step_0000003" / "manifest.json").is_file()
