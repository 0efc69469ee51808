"""Two nodes on one machine: each a network namespace with its own address, joined by a veth pair, each
running ``torchrun --nnodes 2`` with the c10d rendezvous on node 0's address. The job must train to the
same losses as the same config on one node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dist import free_port
from tests.helpers import TINY_GPT2, write_corpus

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Namespaces A (10.213.0.1) and B (10.213.0.2) linked by a veth pair; skipped where not permitted."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed, so no network namespaces can be made")
    tag = f"{os.getpid() % 100000}"
    names, links = (f"colA{tag}", f"colB{tag}"), (f"cva{tag}", f"cvb{tag}")
    made = _ip("netns", "add", names[0])
    if made.returncode != 0:
        pytest.skip(f"this machine does not allow network namespaces (`ip netns add`: {made.stderr.strip()})")
    try:
        steps = [("netns", "add", names[1]),
                 ("link", "add", links[0], "type", "veth", "peer", "name", links[1]),
                 ("link", "set", links[0], "netns", names[0]), ("link", "set", links[1], "netns", names[1])]
        for i, (ns, link) in enumerate(zip(names, links)):
            steps += [("-n", ns, "addr", "add", f"10.213.0.{i + 1}/24", "dev", link),
                      ("-n", ns, "link", "set", link, "up"), ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"could not set up the namespaces (`ip {' '.join(step)}`: {done.stderr.strip()})")
        yield [(ns, link, f"10.213.0.{i + 1}") for i, (ns, link) in enumerate(zip(names, links))]
    finally:
        for ns in names:
            _ip("netns", "del", ns)


def _config(tmp: Path, corpus: Path, name: str) -> Path:
    raw = {"model": {"arch": "gpt2", "tokenizer": "byte", "config": TINY_GPT2},
           "data": {"train_files": [str(corpus / "part[0-2].txt")], "seq_len": 32},
           "train": {"steps": 8, "micro_batch_size": 2, "output_dir": str(tmp / name), "progress": False,
                     "export_hf": False, "save_final": False},
           "parallel": {"zero_stage": 2, "timeout_s": 120}, "logging": {"wandb": {"mode": "disabled"}}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ, WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_namespace_nodes_train_like_one_node(tmp_path, two_hosts):
    corpus = write_corpus(tmp_path / "corpus")
    one = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "train.py",
                          "--config", str(_config(tmp_path, corpus, "one_node"))],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    config = _config(tmp_path, corpus, "two_nodes")
    master = two_hosts[0][2]
    nodes = [subprocess.Popen(["ip", "netns", "exec", ns, TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master}:29611", "--rdzv_id", "colonnade",
                               # torchrun knows a node by its hostname, which both namespaces share: name the addresses
                               "--rdzv_conf", f"is_host={int(address == master)}", "--local_addr", address,
                               "train.py", "--config", str(config)],
                              cwd=ROOT, env=_env(GLOO_SOCKET_IFNAME=link), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for ns, link, address in two_hosts]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:]
    # Same global batch and data order; the 2-way gradient average is a + b either way (commutative in fp32),
    # so the losses are identical whichever node the rendezvous made rank 0.
    assert _losses(tmp_path / "two_nodes") == _losses(tmp_path / "one_node")
