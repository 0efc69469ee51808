"""Gradient compression on a slow link: the same 2-node data-parallel training with each
``parallel.grad_compression`` mode, over two network namespaces joined by a veth pair whose rate ``tc`` limits.

    python -m bench slow-link --out bench/results/slow-link-cpu

Per link (``--links``: ``fast`` is the plain veth, ``1gbit`` / ``100mbit`` a token bucket on both ends) the
rate is measured first (a TCP transfer from one namespace to the other), then each mode trains GPT-2
(12 x 768 x 12, byte tokens, seq 128, micro-batch 1) at DP=2, one ``torchrun`` process per namespace, ZeRO-0:
the step record's ``dp_bytes_sent``, the median ``step_time_s`` and ``tokens_per_s`` of the steps after
``--warmup``, the last loss.

The fit, per mode: ``step_s = compute_s + wire_factor * bytes_sent / link_rate`` (least squares over the links;
``compute_s`` holds the forward/backward/optimizer, the codec's encode/decode and the fixed latencies,
``wire_factor`` how much slower than the measured TCP rate the collective moves its bytes). A mode beats ``none``
below the bandwidth where the wire time it saves equals its extra ``compute_s`` (the crossover). The codec's cost
per fp32 gradient byte, ``(compute_s - compute_s[none]) / gradient bytes``, carries the load of whatever else
runs on the cores, so the command also takes one thread's CPU seconds of a step and of each codec's passes
(``cpu_costs``): the step estimated without that load, its crossovers, and what ``bench plan --link-gbps``
prices a layout's data-parallel gradients with (``choose_mode``).

    python -m bench slow-link --from-results R/results.json --repeat R/repeat-100mbit.json --out R

redoes the fit, report and plot of a stored run, with another run of some link x mode next to it (not fitted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.slow_link_fit import analyse, plot, report

PROG = "bench slow-link"
MODES = ("none", "bf16", "int8", "int4")
RATES = {"fast": None, "10gbit": 10_000, "1gbit": 1000, "500mbit": 500, "100mbit": 100, "50mbit": 50}
ROOT = Path(__file__).resolve().parents[1]
PROBE = """import socket, sys, time
role, host, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "server":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, 29555)); s.listen(1)
    c, _ = s.accept(); got = 0
    while got < n:
        got += len(c.recv(1 << 20))
    c.sendall(b"x")
else:
    for _ in range(100):
        try:
            s = socket.create_connection((host, 29555)); break
        except OSError:
            time.sleep(0.1)
    buf, sent, t = bytes(1 << 20), 0, time.perf_counter()
    while sent < n:
        s.sendall(buf); sent += len(buf)
    s.recv(1); print(sent / (time.perf_counter() - t))
"""


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


class TwoHosts:
    """Namespaces A (10.214.0.1) and B (10.214.0.2) joined by a veth pair; ``close`` deletes them."""

    def __init__(self):
        tag = os.getpid() % 100000
        self.names, self.links = (f"colslA{tag}", f"colslB{tag}"), (f"csla{tag}", f"cslb{tag}")
        self.addresses = ("10.214.0.1", "10.214.0.2")
        self.made: list[str] = []
        try:
            for ns in self.names:
                self._do("netns", "add", ns)
                self.made.append(ns)
            self._do("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
            for ns, link, address in zip(self.names, self.links, self.addresses):
                self._do("link", "set", link, "netns", ns)
                self._do("-n", ns, "addr", "add", f"{address}/24", "dev", link)
                self._do("-n", ns, "link", "set", link, "up")
                self._do("-n", ns, "link", "set", "lo", "up")
        except RuntimeError:
            self.close()
            raise

    @staticmethod
    def _do(*args: str) -> None:
        done = _ip(*args)
        if done.returncode != 0:
            raise RuntimeError(f"`ip {' '.join(args)}`: {done.stderr.strip()}")

    def shape(self, mbit: int | None) -> None:
        """A token bucket of ``mbit`` Mbit/s on both ends' egress (None: none). netem (delay) is not used: this
        machine's kernel is built without it (CONFIG_NET_SCH_NETEM), tbf is there."""
        for ns, link in zip(self.names, self.links):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", link, "root"],
                           capture_output=True)
            if mbit is not None:
                burst = f"{max(64, mbit // 2)}kb"
                self._do("netns", "exec", ns, "tc", "qdisc", "add", "dev", link, "root", "tbf", "rate",
                         f"{mbit}mbit", "burst", burst, "latency", "100ms")

    def exec(self, i: int, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[i], *cmd]

    def close(self) -> None:
        for ns in self.made:
            _ip("netns", "del", ns)
        self.made = []


def measure_rate(hosts: TwoHosts, nbytes: int) -> float:
    """Bytes per second of one TCP transfer of ``nbytes`` from A to B."""
    server = subprocess.Popen(hosts.exec(1, [sys.executable, "-c", PROBE, "server", hosts.addresses[1], str(nbytes)]))
    try:
        client = subprocess.run(hosts.exec(0, [sys.executable, "-c", PROBE, "client", hosts.addresses[1],
                                               str(nbytes)]), capture_output=True, text=True, timeout=300)
        server.wait(timeout=30)
    finally:
        server.kill()
    if client.returncode != 0:
        raise RuntimeError(f"rate probe failed: {client.stderr.strip()[-500:]}")
    return float(client.stdout.strip().splitlines()[-1])


def run_config(args, out: Path, mode: str, zero: int) -> dict:
    return {"model": {"arch": "gpt2", "tokenizer": "byte",
                      "config": {"n_layer": args.layers, "n_embd": args.hidden, "n_head": args.heads,
                                 "n_positions": 256}},
            "data": {"train_files": [args.files], "seq_len": args.seq_len},
            "train": {"steps": args.warmup + args.steps, "micro_batch_size": 1, "output_dir": str(out),
                      "progress": False, "export_hf": False, "save_final": False, "eval_every": 0, "log_every": 1},
            "parallel": {"zero_stage": zero, "grad_compression": mode, "timeout_s": 900},
            "logging": {"wandb": {"mode": "disabled"}}}


def _env(link: str) -> dict[str, str]:
    env = dict(os.environ, WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", GLOO_SOCKET_IFNAME=link)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_pair(hosts: TwoHosts, config: Path, port: int, timeout: float) -> None:
    """One ``torchrun`` node per namespace (c10d rendezvous on A's address), waited for."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    master = hosts.addresses[0]
    nodes = [subprocess.Popen(hosts.exec(i, [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend",
                                             "c10d", "--rdzv_endpoint", f"{master}:{port}", "--rdzv_id", "slowlink",
                                             "--rdzv_conf", f"is_host={int(i == 0)}", "--local_addr",
                                             hosts.addresses[i], "train.py", "--config", str(config)]),
                              cwd=ROOT, env=_env(hosts.links[i]), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, out in zip(nodes, outputs):
        if node.returncode != 0:
            from bench.launch import first_error

            raise RuntimeError(f"training failed: {first_error(out)}")


def summarize(records: list[dict], warmup: int) -> dict:
    """Median step time, tokens/s and bytes sent of the steps after ``warmup``; the last loss."""
    timed = [r for r in records if "loss" in r and r["step"] > warmup]
    return {"steps": len(timed), "step_s": statistics.median(r["step_time_s"] for r in timed),
            "step_s_all": [r["step_time_s"] for r in timed],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "bytes_sent": int(statistics.median(r["dp_bytes_sent"] for r in timed)),
            "loss": timed[-1]["loss"], "losses": [r["loss"] for r in records if "loss" in r]}


def measure(args) -> dict:
    """Every link x mode trained; the raw measurements (written to ``--out`` after each run)."""
    from bench.machine import describe

    result = {"machine": describe(), "model": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                                               "seq_len": args.seq_len, "micro_batch": 1, "data_parallel": 2},
              "warmup": args.warmup, "steps": args.steps, "zero": args.zero, "links": {}, "runs": [],
              "grad_bytes": grad_bytes(args)}
    started, port = time.monotonic(), 29700
    result["cpu"] = cpu_costs(args)
    hosts = TwoHosts()
    try:
        for link in args.links.split(","):
            hosts.shape(RATES[link])
            probe = 2 * 10**9 if RATES[link] is None else RATES[link] * 10**6 // 8 * 2
            rate = measure_rate(hosts, probe)
            result["links"][link] = {"set_mbit": RATES[link], "measured_Bps": rate}
            print(f"{PROG}: {link}: measured {rate * 8 / 1e6:,.0f} Mbit/s", flush=True)
            for mode in args.modes.split(","):
                port += 1
                result["runs"].append(_one_run(args, hosts, link, mode, port))
                result["wall_s"] = time.monotonic() - started
                if args.out:
                    Path(args.out).mkdir(parents=True, exist_ok=True)
                    (Path(args.out) / "results.json").write_text(json.dumps(result, indent=1))
    finally:
        hosts.close()
    result["wall_s"] = time.monotonic() - started
    return result


def _one_run(args, hosts: TwoHosts, link: str, mode: str, port: int) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        out, config = Path(tmp) / "run", Path(tmp) / "run.yaml"
        config.write_text(yaml.safe_dump(run_config(args, out, mode, args.zero)))
        began = time.monotonic()
        train_pair(hosts, config, port, args.timeout)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row = {"link": link, "mode": mode, "zero": args.zero, "run_wall_s": time.monotonic() - began,
           **summarize(records, args.warmup)}
    print(f"{PROG}: {link} {mode}: {row['bytes_sent'] / 1e6:,.1f} MB/step, {row['step_s']:.2f} s/step, "
          f"loss {row['loss']:.3f} ({row['run_wall_s']:.0f} s)", flush=True)
    return row


def grad_bytes(args) -> int:
    """fp32 bytes of the model's gradients (its parameter count x 4), counted on the meta device."""
    from bench.plan_trace import full_meta_model
    from training.config import validate

    model = full_meta_model(validate(run_config(args, Path("unused"), "none", args.zero)))
    return 4 * sum(p.numel() for p in model.parameters())



def _cpu_seconds(fn, repeats: int) -> float:
    """Median process CPU seconds of ``fn`` (after one untimed call): what the other jobs sharing the cores do
    not inflate, as they inflate wall time."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return statistics.median(times)


def cpu_costs(args, repeats: int = 2) -> dict:
    """One thread's CPU seconds of one training step's forward + backward + AdamW (one process, the run's
    model and micro-batch) and of each codec's encode/decode passes over the gradient as ``compressed_mean_``
    makes them at DP=2 (the collectives left out)."""
    import functools

    import torch

    from parallel.compression import Codec, padded_chunk

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compute, numel = _step_cpu(args, repeats)
        out = {"compute_cpu_s": compute, "codec_cpu_s": {"none": 0.0}}
        flat = torch.randn(2 * padded_chunk(numel, 2))
        for name in ("bf16", "int8", "int4"):
            out["codec_cpu_s"][name] = _cpu_seconds(functools.partial(_codec_passes, Codec(name), flat), repeats)
        return out
    finally:
        torch.set_num_threads(threads)


def _step_cpu(args, repeats: int) -> tuple[float, int]:
    """(CPU seconds of a forward + backward + AdamW step, parameters) of the run's model, one process."""
    import torch

    from modeling.build import auto_class, byte_level_tokenizer, model_config

    shape = run_config(args, Path("unused"), "none", 0)["model"]["config"]
    hf = model_config(pretrained=None, arch="gpt2", config=shape, vocab_size=len(byte_level_tokenizer()))
    model = auto_class(hf).from_config(hf)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, hf.vocab_size, (1, args.seq_len))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return _cpu_seconds(step, repeats), sum(p.numel() for p in model.parameters())


def _codec_passes(codec, values) -> None:
    """``compressed_mean_``'s encodes and decodes at 2 ranks with error feedback, without sending anything."""
    import torch

    rows = values.view(2, values.numel() // 2).clone()
    sent = codec.encode(rows, lost=rows)
    mean = codec.decode_mean(sent, rows.shape[1])
    own = codec.encode(mean.unsqueeze(0), lost=mean.unsqueeze(0))
    rows[0] += mean.mul_(2)
    codec.decode(torch.cat([own, own]), rows.shape[1], out=rows)


def _check(args) -> None:
    from bench.cli import fail
    from training.config import ConfigError, validate
    from training.data import expand_files

    for link in args.links.split(","):
        if link not in RATES:
            fail(PROG, f"--links: unknown link {link!r}; choose from {', '.join(RATES)}")
    for mode in args.modes.split(","):
        if mode not in MODES:
            fail(PROG, f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if "none" not in args.modes.split(","):
        fail(PROG, f"--modes {args.modes}: must include none (every ratio and crossover is against it)")
    for flag in ("steps", "layers", "hidden", "heads", "seq_len"):
        if getattr(args, flag) < 1:
            fail(PROG, f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.warmup < 0:
        fail(PROG, f"--warmup {args.warmup}: must be at least 0")
    if args.from_results is None and shutil.which("ip") is None:
        fail(PROG, "iproute2's `ip` is not installed: no network namespaces can be made")
    try:
        expand_files([args.files], "--files")
        validate(run_config(args, Path("unused"), "int8", args.zero))
    except (ConfigError, OSError, ValueError) as exc:
        fail(PROG, str(exc))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench slow-link", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", default="fast,1gbit,100mbit", help=f"comma-separated, of {', '.join(RATES)}")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--zero", type=int, choices=(0, 1, 2), default=0)
    parser.add_argument("--files", default="{stdlib}/[a-s]*.py", help="training text (the quickstart's)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (median)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one run may take")
    parser.add_argument("--scratch", default=None, help="directory for the runs' output (default: the system's)")
    parser.add_argument("--from-results", help="a results.json of this command: redo the fit, report and plot")
    parser.add_argument("--repeat", action="append", default=[], help="with --from-results: another results.json "
                        "of this command (a repeat of some link x mode runs) reported next to it, not fitted")
    parser.add_argument("--out", help="directory for results.json, report.md and step_time.png")
    args = parser.parse_args(argv)
    _check(args)
    if args.from_results:
        result = json.loads(Path(args.from_results).read_text())
        result.setdefault("cpu", cpu_costs(args))
        result["repeats"] = [{key: json.loads(Path(path).read_text())[key] for key in ("links", "runs", "machine")}
                             for path in args.repeat] or result.get("repeats", [])
    else:
        try:
            result = measure(args)
        except RuntimeError as exc:
            from bench.cli import fail

            fail(PROG, str(exc))
    result = analyse(result)
    from bench.machine import publish

    publish(result, report(result), args.out)
    if args.out:
        plot(result, Path(args.out) / "step_time.png")
    return result
