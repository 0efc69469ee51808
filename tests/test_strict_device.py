"""No host tensor reaches a collective from our code (what NCCL would reject at step 1), checked on the CPU box
with tests/strict_device.py over the data-parallel (ZeRO-1 and ZeRO-3), tensor-parallel (ZeRO-0 gradient norm,
sequence parallelism), pipeline (1F1B and interleaved), context-parallel (Ulysses with packed documents, ring
under TP) and sequence-to-sequence paths: training steps,
evaluation, checkpoint save and export."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_ranks
from tests.helpers import TINY_GPT2, tiny_config, write_corpus
from tests.strict_device import StrictDevice

pytestmark = pytest.mark.multiprocess


def _strict_runs(cfgs):
    from training import run

    with StrictDevice() as strict:
        for cfg in cfgs:
            run(cfg)
    return strict.violations, strict.checked


def _three_reductions():
    import tests.strict_device as module
    from training.lifecycle import init_distributed

    init_distributed()
    module.OURS += (str(module.ROOT / "tests") + "/",)  # these calls come from a test: count them as ours
    model = torch.nn.Linear(2, 2)  # made on the CPU by factories, then placed like DeepSpeed places it
    model.to(torch.device("cpu"))
    with StrictDevice() as strict:
        dist.all_reduce(torch.tensor([1.0]))  # host-born: would be a CPU tensor under NCCL
        dist.all_reduce(torch.ones(2, device=torch.device("cpu")).double())  # placed explicitly
        dist.all_reduce(torch.zeros(3).cpu() + 1)  # host-born
        dist.all_reduce(model.weight.detach() * 2)  # the model's
    return strict.violations


def test_the_checker_catches_host_tensors_and_passes_placed_ones():
    violations = run_ranks(_three_reductions, 1, timeout=120)[0]
    assert len(violations) == 2 and all("dist.all_reduce got a host tensor" in v for v in violations), violations


@pytest.mark.slow
def test_no_host_tensor_reaches_a_collective(tmp_path):
    from tests.test_seq2seq_training import seq2seq_config, toy_task

    corpus = write_corpus(tmp_path / "corpus")
    common = dict(train__steps=2, optim__warmup_steps=1, train__export_hf=True)
    cfgs = [tiny_config(tmp_path / "dp", corpus, parallel__zero_stage=1, **common),
            tiny_config(tmp_path / "tp", corpus, parallel__tensor=2, parallel__zero_stage=0, **common),
            tiny_config(tmp_path / "pp", corpus, parallel__pipeline=2, parallel__zero_stage=1, train__grad_accum=2,
                        **common),
            tiny_config(tmp_path / "vpp", corpus, parallel__pipeline=2, parallel__zero_stage=2, train__grad_accum=2,
                        parallel__schedule="interleaved", parallel__virtual_stages=2,
                        model={"arch": "gpt2", "tokenizer": "byte", "config": dict(TINY_GPT2, n_layer=4)}, **common),
            tiny_config(tmp_path / "sp", corpus, parallel__tensor=2, parallel__sequence_parallel=True,
                        parallel__zero_stage=1, **common),
            tiny_config(tmp_path / "z3", corpus, parallel__zero_stage=3, **common),
            tiny_config(tmp_path / "cp", corpus, parallel__context=2, **common,
                        data={"train_files": [str(corpus / "part[0-2].txt")], "seq_len": 32,
                              "valid_files": [str(corpus / "part3.txt")], "separate_documents": True}),
            tiny_config(tmp_path / "cp-ring", corpus, parallel__context=2, parallel__context_attention="ring",
                        parallel__tensor=2, parallel__zero_stage=1, model__config=dict(TINY_GPT2, n_head=4),
                        **common),
            seq2seq_config(tmp_path / "s2s", toy_task(tmp_path / "task", train=32, valid=4), parallel__tensor=2,
                           parallel__zero_stage=2, train__steps=2, eval__max_new_tokens=4)]
    violations, checked = run_ranks(_strict_runs, 4, cfgs, timeout=600)[0]
    assert checked > 50, checked
    assert not violations, "\n".join(sorted(set(violations)))
