"""Memory defaults (issue 30 point 4): ZeRO buckets sized by the model, as HF Trainer's "auto"; glibc returns
freed tensors to the system in CPU ranks."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from tests.conftest import ROOT
from tests.dist import run_ranks
from tests.helpers import tiny_config, write_corpus
from training.config import validate
from training.deepspeed_config import check_user_deepspeed_config, deepspeed_config
from training.engine import fill_model_sized_buckets

MINIMAL = {"model": {"arch": "gpt2"}, "data": {"train_files": ["x.txt"], "seq_len": 16}, "train": {"steps": 5}}


def _zero(stage: int, hidden_size=None, **parallel) -> dict:
    cfg = validate({**MINIMAL, "parallel": {"zero_stage": stage, **parallel}})
    return deepspeed_config(cfg, 1, hidden_size=hidden_size)["zero_optimization"]


@pytest.mark.unit
def test_buckets_follow_the_hidden_size_unless_set():
    hidden = 1536  # bench/llama_demo.py's Llama: 2.36 M elements, 9 MB per fp32 bucket where DeepSpeed's are 2 GB
    zero2 = _zero(2, hidden)
    assert zero2["reduce_bucket_size"] == zero2["allgather_bucket_size"] == hidden**2
    assert "stage3_prefetch_bucket_size" not in zero2
    zero3 = _zero(3, hidden)
    assert (zero3["reduce_bucket_size"], zero3["stage3_prefetch_bucket_size"],
            zero3["stage3_param_persistence_threshold"]) == (hidden**2, int(0.9 * hidden**2), 10 * hidden)
    assert _zero(2, hidden, bucket_size=5 * 10**7)["reduce_bucket_size"] == 5 * 10**7  # the config's own value
    assert "reduce_bucket_size" not in _zero(0, hidden)
    assert "reduce_bucket_size" not in _zero(2)  # no model known: the engine fills it


@pytest.mark.unit
def test_a_user_json_keeps_its_value_and_auto_means_the_model_sized_one():
    cfg = validate({**MINIMAL, "parallel": {"zero_stage": 3}})
    model = torch.nn.Linear(2, 2)
    model.config = transformers.GPT2Config(n_embd=64)
    user = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": 1000,
                                  "stage3_param_persistence_threshold": "auto"}}
    merged = check_user_deepspeed_config(user, cfg, 1)
    fill_model_sized_buckets(merged, model)
    assert {k: v for k, v in merged["zero_optimization"].items() if "bucket" in k or "persistence" in k} == {
        "reduce_bucket_size": 64**2, "allgather_bucket_size": 64**2, "stage3_prefetch_bucket_size": 1000,
        "stage3_param_persistence_threshold": 640}


def _bucket_sizes(cfg):
    from training import run

    engine = run(cfg).engine
    return engine.zero_reduce_bucket_size(), engine.zero_allgather_bucket_size()


@pytest.mark.multiprocess
def test_a_run_uses_and_records_model_sized_buckets(tmp_path):
    cfg = tiny_config(tmp_path, write_corpus(tmp_path / "corpus"), parallel__zero_stage=2, train__steps=2,
                      train__eval_batches=1)
    hidden = cfg.model.config["n_embd"]
    assert run_ranks(_bucket_sizes, 1, cfg)[0] == (hidden**2, hidden**2)  # what DeepSpeed's engine was given
    written = json.loads((tmp_path / "run" / "deepspeed.json").read_text())["zero_optimization"]
    assert written["reduce_bucket_size"] == written["allgather_bucket_size"] == hidden**2

# A freed 20 MB tensor raises glibc's dynamic mmap threshold to 20 MB (and its trim threshold to 40 MB), so
# that a later 8 MB tensor comes from the heap, which keeps it resident when freed. With the fixed 256 KB
# threshold both are mappings of their own, returned when freed. A user's threshold (16 MB here) puts the 8 MB
# tensor in the heap too.
FREED_8MB_TENSOR = textwrap.dedent("""
    import sys
    import torch
    from training import host_memory

    def anonymous():
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) * 1024 for l in status if l.startswith("RssAnon:"))

    size = int(sys.argv[2])  # the bytes of parameters the rank holds
    applied = host_memory.release_freed_tensors(sys.argv[1], size) if sys.argv[1] != "-" else False
    torch.ones(5 * 2**20).sum()  # 20 MB, freed
    before = anonymous()
    tensor = torch.ones(2 * 2**20)  # 8 MB
    after = torch.ones(2**18)  # 1 MB above it in the heap: glibc cannot trim the heap's top either
    del tensor
    print(applied, (anonymous() - before - after.nbytes) / 2**20)
""")


def _kept_mb(device: str, parameter_bytes: int = 2**30, **env) -> tuple[bool, float]:
    environment = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", FREED_8MB_TENSOR, device, str(parameter_bytes)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**environment, **env},
                         check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_cpu_rank_returns_a_freed_tensor_to_the_system():
    assert _kept_mb("cpu") == (True, pytest.approx(0, abs=1))
    without = _kept_mb("-")  # glibc's dynamic threshold: the 8 MB stay resident
    assert not without[0] and without[1] > 7
    assert _kept_mb("cuda") == (False, pytest.approx(without[1], abs=1))  # host memory of GPU runs: untouched
    users = _kept_mb("cpu", MALLOC_MMAP_THRESHOLD_=str(16 * 2**20))  # the user's own threshold stays
    assert not users[0] and users[1] > 7
    small = _kept_mb("cpu", parameter_bytes=2**20)  # a small model's rank: glibc's default (faster steps)
    assert not small[0] and small[1] > 7


@pytest.mark.unit
@pytest.mark.parametrize("saved_tp,saved_dp,transposed", [(2, 3, False), (4, 1, False), (1, 2, False),
                                                          (2, 2, True), (1, 1, True)])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_zero_partition_is_read_without_its_whole_tensor(tmp_path, monkeypatch, saved_tp, saved_dp, transposed,
                                                            tp):
    """Resume reads, per parameter, the flat range of its ZeRO partition: the rows of the rank's local tensor
    that hold it, from the saved rows they overlap, not the whole tensor; and it lets go of the files' pages
    (here after every read)."""
    from tests.test_checkpoint_pieces import FULL, _save, _shard
    from training.checkpoint import pieces
    from training.checkpoint.pieces import CheckpointReader

    monkeypatch.setattr(pieces, "MAPPED_BYTES", 0)

    full = torch.arange(60, dtype=torch.float32).view(FULL)
    _save(tmp_path, full, saved_tp, saved_dp, transposed and saved_tp > 1)
    reader = CheckpointReader(tmp_path)
    read, original = [], reader._read

    def counted(*args):
        read.append(original(*args))
        return read[-1]

    reader._read = counted
    for rank in range(tp):
        wanted = _shard(rank, tp, transposed=transposed)
        expected = wanted.cut(full).reshape(-1)
        share = -(-expected.numel() // 4)  # a data-parallel rank's partition at DP=4
        for start in range(0, expected.numel(), share):
            stop = min(start + share, expected.numel())
            read.clear()
            got = reader.local_range("model/w", wanted, tuple(wanted.cut(full).shape), torch.float32, start, stop)
            assert torch.equal(got, expected[start:stop]), (rank, start)
            assert not reader._open  # every file closed, its pages unmapped
            if not transposed:  # Conv1D saved or read at TP=1 lies the other way round: whole saved rows
                assert sum(r.numel() for r in read) <= expected.numel() // 2, (rank, start)


@pytest.mark.multiprocess
def test_a_zero3_run_resumes_its_partitions_from_a_zero1_checkpoint(tmp_path):
    """ZeRO-3 at DP=2 writes each rank's partition range of the moments (``put_range``, the last one padded) from
    a ZeRO-1 checkpoint: steps 3 and 4 are the uninterrupted run's (tolerance as in tests/test_checkpoint.py:
    only the data-parallel summation order differs)."""
    from tests.helpers import run_configs, step_records

    corpus = write_corpus(tmp_path / "corpus")
    full = tiny_config(tmp_path / "full", corpus, parallel__zero_stage=1, train__steps=4, train__save_every=2,
                       train__eval_batches=1)
    saved = tmp_path / "full" / "run" / "checkpoints" / "step_0000002"
    resumed = tiny_config(tmp_path / "z3", corpus, parallel__zero_stage=3, train__steps=4, train__eval_batches=1,
                          train__resume=str(saved))
    full_hist, resumed_hist = run_ranks(run_configs, 2, [full, resumed], timeout=600)[0]
    expected, got = step_records(full_hist)[2:], step_records(resumed_hist)
    assert [r["step"] for r in got] == [3, 4]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-5)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-5)
