"""Loading never runs code it was not allowed to: pickled weights load with ``weights_only=True`` (a
payload is refused and named), and a checkpoint's own model code runs only with model.trust_remote_code."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import TINY_GPT2

pytestmark = pytest.mark.unit


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_payload_is_refused_and_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling.build import build_model

    checkpoint = tmp_path / "bin_checkpoint"
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, **TINY_GPT2))
    model.config.save_pretrained(checkpoint)
    torch.save({**model.state_dict(), "payload": _Payload(tmp_path / "RAN")}, checkpoint / "pytorch_model.bin")
    with pytest.raises(ValueError, match=f"model.pretrained={checkpoint}: its pickled weights hold more than tensors"):
        build_model(pretrained=str(checkpoint), arch=None, config={}, vocab_size=None, seed=0)
    assert not (tmp_path / "RAN").exists()
    torch.save(model.state_dict(), checkpoint / "pytorch_model.bin")  # plain tensors still load
    loaded = build_model(pretrained=str(checkpoint), arch=None, config={}, vocab_size=None, seed=0)
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)


def test_checkpoint_code_runs_only_when_trusted(tmp_path):
    from transformers import GPT2Config

    from modeling.build import hf_config

    checkpoint = tmp_path / "remote_code"
    checkpoint.mkdir()
    config = GPT2Config(vocab_size=300, **TINY_GPT2).to_dict()
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "RAN"
    (checkpoint / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                          "from transformers import GPT2Config\n"
                                          "class CustomConfig(GPT2Config):\n    pass\n")
    assert hf_config(pretrained=str(checkpoint), arch=None, config={}).model_type == "gpt2"
    assert not marker.exists(), "the checkpoint's code ran without model.trust_remote_code"
    hf_config(pretrained=str(checkpoint), arch=None, config={}, trust_remote_code=True)
    assert marker.exists()
