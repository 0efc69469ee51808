"""Typed config: strict keys with suggestions, types, overrides and precedence, DeepSpeed JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from training.config import ConfigError, load, validate
from training.deepspeed_config import check_user_deepspeed_config, deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"arch": "gpt2"}, "data": {"train_files": ["x.txt"], "seq_len": 16}, "train": {"steps": 5}}


def write(tmp_path, raw) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.unit
def test_unknown_key_names_dotted_key_and_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key; did you mean optim\.lr\?"):
        load(write(tmp_path, {**MINIMAL, "optim": {"lrr": 1e-3}}))
    with pytest.raises(ConfigError, match=r"optimm: unknown key; did you mean optim\?"):
        load(write(tmp_path, {**MINIMAL, "optimm": {}}))


@pytest.mark.unit
def test_wrong_type_and_impossible_values(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, MINIMAL), ["train.steps=abc", "train.micro_batch_size=0", "precision=fp8",
                                        "parallel.zero_stage=4"])
    text = str(err.value)
    for key in ("train.steps='abc'", "train.micro_batch_size=0", "precision='fp8'", "parallel.zero_stage=4"):
        assert key in text
    with pytest.raises(ConfigError, match="data.seq_len: required key is missing"):
        validate({**MINIMAL, "data": {"train_files": ["x"]}})
    with pytest.raises(ConfigError, match="exactly one of model.pretrained"):
        validate({**MINIMAL, "model": {"arch": "gpt2", "pretrained": "/ckpt"}})
    with pytest.raises(ConfigError, match="parallel.zero_stage=3 with both parallel.tensor>1 and parallel.pipeline>1"):
        validate({**MINIMAL, "parallel": {"tensor": 2, "pipeline": 2, "zero_stage": 3}})
    with pytest.raises(ConfigError, match="parallel.zero_stage=0 with parallel.pipeline=2: ZeRO-0 is not wired"):
        validate({**MINIMAL, "parallel": {"pipeline": 2}})
    with pytest.raises(ConfigError, match="schedule=zb-h1 with parallel.zero_stage=3 is not supported"):
        validate({**MINIMAL, "parallel": {"pipeline": 2, "zero_stage": 3, "schedule": "zb-h1"}})
    with pytest.raises(ConfigError, match="schedule=zb-h1 need parallel.pipeline > 1"):
        validate({**MINIMAL, "parallel": {"schedule": "zb-h1"}})
    with pytest.raises(ConfigError, match="interleaved needs train.grad_accum .* multiple of parallel.pipeline"):
        validate({**MINIMAL, "parallel": {"pipeline": 2, "zero_stage": 1, "schedule": "interleaved",
                                          "virtual_stages": 2}, "train": {"steps": 5, "grad_accum": 3}})
    with pytest.raises(ConfigError, match="precision=bf16 with parallel.zero_stage=0: .* use parallel.zero_stage=1"):
        validate({**MINIMAL, "precision": "bf16"})
    with pytest.raises(ConfigError, match="sequence_parallel=true needs parallel.tensor > 1"):
        validate({**MINIMAL, "parallel": {"sequence_parallel": True}})
    seq2seq = {**MINIMAL, "model": {"arch": "marian"},
               "data": {"train_files": ["x.jsonl"], "seq_len": 16, "source_field": "en", "target_field": "de"}}
    with pytest.raises(ConfigError, match="parallel.pipeline=2 with an encoder-decoder run .* Every decoder layer "
                                          "attends to the encoder's output"):
        validate({**seq2seq, "parallel": {"pipeline": 2, "zero_stage": 1}, "train": {"steps": 5, "grad_accum": 2}})
    with pytest.raises(ConfigError, match="set both data.source_field and data.target_field"):
        validate({**seq2seq, "data": {"train_files": ["x.jsonl"], "seq_len": 16, "source_field": "en"}})


@pytest.mark.unit
def test_overrides_take_precedence_over_file_over_defaults(tmp_path):
    path = write(tmp_path, {**MINIMAL, "optim": {"lr": 1e-3}})
    assert load(path).optim.lr == 1e-3                       # file beats default (3e-4)
    assert load(path).optim.weight_decay == 0.0              # default where the file is silent
    cfg = load(path, ["optim.lr=3e-4", "train.steps=50", "optim.betas=[0.8, 0.9]"])
    assert (cfg.optim.lr, cfg.train.steps, cfg.optim.betas) == (3e-4, 50, (0.8, 0.9))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load(path, ["optim.lr"])


@pytest.mark.unit
def test_config_is_frozen():
    cfg = validate(MINIMAL)
    with pytest.raises(ValidationError, match="Instance is frozen"):
        cfg.train.steps = 3


@pytest.mark.unit
def test_generated_deepspeed_json():
    cfg = validate({**MINIMAL, "train": {"steps": 5, "micro_batch_size": 4, "grad_accum": 3},
                    "parallel": {"zero_stage": 2}, "precision": "bf16"})
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 4 * 3 * 4
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "reduce_bucket_size" not in ds["zero_optimization"]  # DeepSpeed's default unless asked
    sized = deepspeed_config(validate({**MINIMAL, "parallel": {"zero_stage": 2, "bucket_size": 5 * 10**7}}), 1)
    assert sized["zero_optimization"]["reduce_bucket_size"] == sized["zero_optimization"]["allgather_bucket_size"] \
        == 5 * 10**7
    assert "stage3_max_live_parameters" not in sized["zero_optimization"]
    lean = deepspeed_config(validate({**MINIMAL, "parallel": {"zero_stage": 3, "zero3_live_parameters": 10**6}}), 1)
    assert lean["zero_optimization"]["stage3_max_live_parameters"] == 10**6
    assert lean["zero_optimization"]["stage3_max_reuse_distance"] == 10**6


@pytest.mark.unit
def test_adamw_is_torch_fused_kernel_unless_asked_otherwise():
    from training.engine import build_optimizer

    model = torch.nn.Linear(4, 4)
    fused, _ = build_optimizer(model, validate(MINIMAL).optim, total_steps=3)
    foreach, _ = build_optimizer(model, validate({**MINIMAL, "optim": {"fused": False}}).optim, total_steps=3)
    assert fused.defaults["fused"] is True and not foreach.defaults["fused"]


@pytest.mark.unit
def test_user_deepspeed_json_batch_rule_unknown_keys_and_mismatches():
    cfg = validate({**MINIMAL, "train": {"steps": 5, "micro_batch_size": 2, "grad_accum": 2}})
    good = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "zero_optimization": {"stage": 0, "reduce_bucket_size": 1000}}
    assert check_user_deepspeed_config(good, cfg, 2)["zero_optimization"]["reduce_bucket_size"] == 1000
    with pytest.raises(ConfigError, match=r"train_batch_size \(6\) must equal .* \(2\) x .* \(2\) x "
                                          r"data-parallel size \(2\) = 8, with world size 2"):
        check_user_deepspeed_config({**good, "train_batch_size": 6}, cfg, 2)
    with pytest.raises(ConfigError, match=r"unknown top-level DeepSpeed keys: zero_optimisation "
                                          r"\(did you mean zero_optimization\?\)"):
        check_user_deepspeed_config({**good, "zero_optimisation": {}}, cfg, 2)
    bad = {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2,
           "zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}
    with pytest.raises(ConfigError) as err:
        check_user_deepspeed_config(bad, cfg, 2)
    for line in ("train_micro_batch_size_per_gpu=3 (DeepSpeed JSON) vs train.micro_batch_size=2",
                 "zero_optimization.stage=2 (DeepSpeed JSON) vs parallel.zero_stage=0",
                 "optimizer.params.lr=0.1 (DeepSpeed JSON) vs optim.lr=0.0003"):
        assert line in str(err.value)


@pytest.mark.subprocess
def test_print_config_cli(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/quickstart.yaml", "--print-config",
                          "--set", "optim.lr=5e-4"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    effective, _, ds_text = out.stdout.partition("# DeepSpeed JSON (world size 1)")
    assert yaml.safe_load(effective)["optim"]["lr"] == 5e-4
    assert json.loads(ds_text)["train_batch_size"] == 8
    assert json.loads(ds_text)["zero_optimization"]["reduce_bucket_size"] == 128**2  # model-sized: n_embd²
    bad = subprocess.run([sys.executable, "train.py", "--config", "configs/quickstart.yaml", "--print-config",
                          "--set", "optim.lrr=1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "did you mean optim.lr?" in bad.stderr


@pytest.mark.unit
def test_global_batch_size_derives_grad_accum_for_each_world_size():
    """train.global_batch_size fixes the batch; grad_accum follows the data-parallel size (an elastic restart on
    fewer nodes); a size it does not divide, or a grad_accum that disagrees, is one error naming the keys."""
    from training.config import for_world

    raw = {**MINIMAL, "train": {"steps": 5, "micro_batch_size": 2, "global_batch_size": 16},
           "parallel": {"tensor": 2}}
    cfg = validate(raw)
    assert [for_world(cfg, world).train.grad_accum for world in (2, 4, 8, 16)] == [8, 4, 2, 1]
    assert deepspeed_config(for_world(cfg, 4), 4)["train_batch_size"] == 16
    saved = for_world(cfg, 8).to_dict()  # what config.yaml records: no grad_accum, so it runs at any size
    assert "grad_accum" not in saved["train"] and for_world(validate(saved), 2).train.grad_accum == 8
    with pytest.raises(ConfigError, match=r"train.global_batch_size=16 is not divisible by "
                                          r"train.micro_batch_size=2 x data-parallel size 3 \(world size 6"):
        for_world(cfg, 6)
    both = validate({**raw, "train": {**raw["train"], "grad_accum": 2}})
    assert for_world(both, 8).train.grad_accum == 2
    with pytest.raises(ConfigError, match="train.grad_accum=2 and train.global_batch_size=16 disagree"):
        for_world(both, 4)
    assert for_world(validate(MINIMAL), 4) == validate(MINIMAL)  # without it: grad_accum as written
    piped = validate({**raw, "parallel": {"pipeline": 2, "zero_stage": 1, "schedule": "interleaved",
                                          "virtual_stages": 2},
                      "train": {"steps": 5, "micro_batch_size": 8, "global_batch_size": 16}})
    assert for_world(piped, 2).train.grad_accum == 2  # the schedule's check runs on the derived value
    with pytest.raises(ConfigError, match=r"interleaved needs train.grad_accum \(micro-batches, 1\)"):
        for_world(piped, 4)


@pytest.mark.unit
def test_an_elastic_restart_resumes_its_own_run(monkeypatch):
    from training import elastic

    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert elastic.resume_setting(None) is None and elastic.resume_setting("auto") == "auto"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert elastic.resume_setting(None) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert elastic.resume_setting(None) == "auto" and elastic.resume_setting("/ckpt") == "/ckpt"


@pytest.mark.unit
def test_docs_config_md_is_the_schema():
    """docs/config.md is generated from the schema: a key added, removed or redescribed without regenerating
    fails here (the fix: python -m training.config_doc)."""
    from training.config_doc import DOC, render

    assert DOC.read_text() == render(), "docs/config.md is stale: run python -m training.config_doc"
    assert "| `train.global_batch_size` | int \\| None | null |" in render()  # every section's keys are listed
    assert "| `logging.wandb.mode` |" in render() and "| `precision` |" in render()


@pytest.mark.unit
def test_an_elastic_restart_derives_grad_accum_the_yaml_also_sets(tmp_path):
    """Issue 30 point 2. Before: the restart at DP=1 was refused ("train.grad_accum=1 and
    train.global_batch_size=16 disagree ... remove train.grad_accum") and ``--set train.grad_accum=null`` was
    refused too ("Input should be a valid integer"), so only editing the YAML got the job going again."""
    from training.config import for_world

    raw = {**MINIMAL, "train": {"steps": 5, "micro_batch_size": 8, "grad_accum": 1, "global_batch_size": 16}}
    cfg = validate(raw)
    assert for_world(cfg, 2).train.grad_accum == 1  # the first start at DP=2 agrees
    with pytest.raises(ConfigError, match=r"disagree: .* pass --set train.grad_accum=null"):
        for_world(cfg, 1)  # a first start at DP=1: the YAML's value is wrong, said at once
    assert for_world(cfg, 1, first_start=False).train.grad_accum == 2  # the restart after losing a node
    unset = load(write(tmp_path, raw), ["train.grad_accum=null"])
    assert "grad_accum" not in unset.train.model_fields_set and for_world(unset, 1).train.grad_accum == 2
    resumed = {**MINIMAL, "train": {"steps": 5, "resume": "auto"}}
    assert load(write(tmp_path, resumed), ["train.resume=null"]).train.resume is None
    with pytest.raises(ConfigError, match="train.steps: required key is missing"):
        load(write(tmp_path, MINIMAL), ["train.steps=null"])


@pytest.mark.unit
def test_override_text_that_is_not_yaml_and_values_with_one_fix(tmp_path):
    """Issue 30 points 5-6. Before: yaml.parser.ParserError tracebacks for '[0.9,' and the documented
    '{stdlib}/a*.py' placeholder; an unknown parallel.partition did not list the valid values."""
    path = write(tmp_path, MINIMAL)
    assert load(path, ["data.train_files={stdlib}/a*.py"]).data.train_files == ["{stdlib}/a*.py"]
    with pytest.raises(ConfigError, match=r"optim.betas='\[0.9,': "):
        load(path, ["optim.betas=[0.9,"])
    with pytest.raises(ConfigError, match=r"parallel.partition='foo': expected one of uniform, parameters, "
                                          r"measured or a partition string"):
        load(path, ["parallel.partition=foo"])
    assert load(path, ["parallel.partition=E,t|t,L"]).parallel.partition == "E,t|t,L"
    with pytest.raises(ConfigError, match=r"train.output_dir='': the run needs a directory of its own"):
        load(path, ["train.output_dir="])
    with pytest.raises(ConfigError, match=r"train.overwrite=true starts again .* set one of them"):
        load(path, ["train.overwrite=true", "train.resume=auto"])


@pytest.mark.unit
@pytest.mark.parametrize("setting, message", [
    ("model.config.n_layers=2", "model.config.n_layers: unknown key for model_type 'gpt2'; did you mean "
                                "model.config.n_layer?"),
    ("model.config.n_layer=-1", "model.config.n_layer=-1: must be a positive integer"),
    ("model.config.n_layer=abc", "model.config.n_layer='abc': expected int, got str"),
    ("model.config.n_head=0", "model.config.n_head=0: must be a positive integer"),
    ("model.config.n_head=3", "model.config.n_embd=128 is not divisible by model.config.n_head=3"),
])
def test_model_config_keys_and_values_are_checked_against_the_hf_class(setting, message, capsys):
    """Before: n_layers (a typo) trained 4 layers without a word; n_layer=-1 passed the checks, wrote
    output_dir and failed later; 'abc' and n_head=0 (--print-config: ZeroDivisionError) were tracebacks."""
    import train

    code = train.main(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--set", setting, "--print-config"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"colonnade (rank 0): error: {message}") and err.count("\n") == 1, err
    from modeling.config_check import check_keys

    check_keys("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}})  # a legacy name the class reads
    check_keys("t5", {"decoder_start_token_id": 0})  # not a field of T5Config, but T5's model reads it
