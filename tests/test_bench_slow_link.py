"""bench slow-link: the alpha-beta fit per mode, the crossover bandwidth, the report and plot of a result, the
compression mode ``bench plan --link-gbps`` names, bad input as one line (the timings are in bench/results)."""

from __future__ import annotations

import json
import math

import pytest

from bench import slow_link, slow_link_fit

MB = 10**6
GRAD = 340 * MB
# A made-up truth: per mode, compute seconds (codec included) and bytes sent; wire factor 1.2 for every mode.
TRUTH = {"none": (5.0, GRAD), "bf16": (5.5, GRAD / 2), "int8": (6.0, GRAD * 0.258), "int4": (6.3, GRAD * 0.133)}
LINKS = {"fast": 1.25e9, "1gbit": 1.19e8, "100mbit": 1.2e7}


def _result() -> dict:
    runs = [{"link": link, "mode": mode, "zero": 0, "bytes_sent": int(nbytes), "step_s": compute + 1.2 * nbytes / rate,
             "tokens_per_s": 256 / (compute + 1.2 * nbytes / rate), "loss": 5.0}
            for link, rate in LINKS.items() for mode, (compute, nbytes) in TRUTH.items()]
    return {"machine": {"cpu": "x", "cores": 2, "torch": "t", "date": "2026-12-06"},
            "model": {"layers": 12, "hidden": 768, "heads": 12, "seq_len": 128, "micro_batch": 1, "data_parallel": 2},
            "warmup": 2, "steps": 4, "zero": 0, "grad_bytes": GRAD, "wall_s": 600.0,
            "links": {k: {"set_mbit": None, "measured_Bps": v} for k, v in LINKS.items()}, "runs": runs}


@pytest.mark.unit
def test_fit_recovers_compute_and_wire_factor():
    fit = slow_link_fit.fit_mode([(x, 3.0 + 1.5 * x) for x in (0.01, 2.0, 20.0)])
    assert fit["compute_s"] == pytest.approx(3.0) and fit["wire_factor"] == pytest.approx(1.5)
    assert slow_link_fit.predict(fit, 100, 10) == pytest.approx(3.0 + 1.5 * 10)
    assert slow_link_fit.fit_mode([(1.0, 4.0), (1.0, 6.0)]) == {"compute_s": 4.0, "wire_factor": 1.0}
    # a slope under 1 (compute slowed more on the fast link) is held at 1: no wire beats the measured rate
    assert slow_link_fit.fit_mode([(0.0, 10.0), (10.0, 12.0)]) == {"compute_s": 6.0, "wire_factor": 1.0}


@pytest.mark.unit
def test_crossover_is_where_the_mode_and_none_take_equal_time():
    none, int8 = {"compute_s": 2.0, "wire_factor": 1.0}, {"compute_s": 3.0, "wire_factor": 1.0}
    rate = slow_link_fit.crossover_Bps(int8, 25, none, 100)
    assert rate == pytest.approx(75.0)
    assert slow_link_fit.predict(int8, 25, rate) == pytest.approx(slow_link_fit.predict(none, 100, rate))
    assert slow_link_fit.predict(int8, 25, rate / 2) < slow_link_fit.predict(none, 100, rate / 2)  # int8 wins
    assert slow_link_fit.predict(int8, 25, rate * 2) > slow_link_fit.predict(none, 100, rate * 2)
    assert slow_link_fit.crossover_Bps({"compute_s": 1.5, "wire_factor": 1.0}, 25, none, 100) == math.inf
    assert slow_link_fit.crossover_Bps(int8, 100, none, 100) is None  # saves no bytes: never faster


@pytest.mark.unit
def test_analyse_report_and_plot(tmp_path):
    result = slow_link_fit.analyse(_result())
    fit = result["fit"]
    for mode, (compute, _) in TRUTH.items():
        assert fit[mode]["compute_s"] == pytest.approx(compute) and fit[mode]["wire_factor"] == pytest.approx(1.2)
        assert fit[mode]["codec_s_per_grad_byte"] == pytest.approx((compute - 5.0) / GRAD)
    assert fit["int8"]["wire_ratio"] == pytest.approx(0.258, abs=1e-6)
    assert fit["int8"]["crossover_Bps"] == pytest.approx(1.2 * GRAD * (1 - 0.258) / 1.0)
    at_100 = (6.0 + 1.2 * GRAD * 0.258 / 1.2e7) / (5.0 + 1.2 * GRAD / 1.2e7)
    assert result["bar"]["int8_over_none_100mbit"] == pytest.approx(at_100) and result["bar"]["pass"] is (at_100 <= 0.6)
    assert result["bar"]["best_mode"] == "int4"
    text = slow_link_fit.report(result)
    assert f"| 100mbit | int8 | {GRAD * 0.258 / MB:,.1f} |" in text and "Bar (issue 35" in text
    assert ("PASS" if at_100 <= 0.6 else "FAIL") in text and "Compute times vary from run to run" in text
    assert "From CPU seconds alone" not in text
    result["cpu"] = {"compute_cpu_s": 2.0, "codec_cpu_s": {"none": 0.0, "bf16": 1.0, "int8": 0.5, "int4": 2.0}}
    none_100, int8_100 = 2.0 + GRAD / 1.2e7, 2.5 + GRAD * 0.258 / 1.2e7
    assert "| int8 | 0.50 | " in slow_link_fit.report(result)
    assert f"{int8_100:.2f} | {int8_100 / none_100:.2f} |" in slow_link_fit.report(result)
    assert slow_link_fit.analyse(result)["fit"]["int8"]["codec_s_per_grad_byte"] == 0.5 / GRAD  # the CPU seconds
    assert result["fit"]["int8"]["codec_fit_s_per_grad_byte"] == pytest.approx(1.0 / GRAD)
    int8 = result["fit"]["int8"]
    assert int8["plan_wire_factor"] == 1.0 and int8["wire_factor"] == pytest.approx(1.2)
    repeat = {"machine": result["machine"], "links": {"100mbit": {"measured_Bps": 1.2e7}},
              "runs": [{"link": "100mbit", "mode": m, "bytes_sent": 10**8, "step_s": t, "step_s_all": [t]}
                       for m, t in (("none", 40.0), ("int8", 30.0))]}
    text = slow_link_fit.report({**result, "repeats": [repeat]})
    assert "| 100mbit | 96 | int8 | 100.0 | 30.00 (30.0) | 0.750 |" in text
    assert "Repeated: int8 / none on the 100 Mbit/s link 0.750 -> **FAIL**" in text
    assert ("the two disagree" in text) is result["bar"]["pass"]
    slow_link_fit.plot(result, tmp_path / "step_time.png")
    assert (tmp_path / "step_time.png").stat().st_size > 10_000
    json.dumps(result)  # storable as results.json


@pytest.mark.unit
def test_cpu_costs_time_the_step_and_each_codec():
    import argparse

    args = argparse.Namespace(layers=1, hidden=32, heads=4, seq_len=16, files="x", warmup=1, steps=1, zero=0)
    costs = slow_link.cpu_costs(args, repeats=1)
    assert costs["compute_cpu_s"] > 0 and set(costs["codec_cpu_s"]) == set(slow_link.MODES)
    assert costs["codec_cpu_s"]["none"] == 0 and all(v > 0 for k, v in costs["codec_cpu_s"].items() if k != "none")


@pytest.mark.unit
def test_choose_mode_follows_the_link_rate():
    fit = slow_link_fit.analyse(_result())["fit"]
    assert slow_link_fit.choose_mode(GRAD, 2, 10e9 / 8, fit)[0] == "none"  # 10 Gbit/s: no codec pays for itself
    best, seconds = slow_link_fit.choose_mode(GRAD, 2, 100e6 / 8, fit)
    assert best == "int4" and seconds["int4"] < seconds["int8"] < seconds["bf16"] < seconds["none"]
    # at DP=2 the model's none time is its wire time for the gradient's bytes
    assert seconds["none"] == pytest.approx(1.2 * GRAD / (100e6 / 8))
    assert slow_link_fit.choose_mode(GRAD, 1, 1e6, fit) == ("none", {"none": 0.0})
    # more ranks: a ring all-reduce's 2 (d-1)/d of the gradient on the wire
    assert slow_link_fit.choose_mode(GRAD, 8, 100e6 / 8, fit)[1]["none"] == pytest.approx(1.2 * GRAD * 1.75 / 12.5e6)
    # ZeRO-1/2: the parameter all-gather stays fp32; ZeRO-3: no compression
    zero1 = slow_link_fit.choose_mode(GRAD, 2, 100e6 / 8, fit, zero=1)[1]
    assert zero1["none"] == seconds["none"]
    assert zero1["int8"] == pytest.approx(fit["int8"]["codec_s_per_grad_byte"] * GRAD + 1.2 * GRAD / 2 * 1.258 / 12.5e6)
    assert slow_link_fit.choose_mode(GRAD, 2, 1e6, fit, zero=3)[0] == "none"


@pytest.mark.unit
def test_plan_names_the_fastest_compression_mode(tmp_path, capsys):
    from bench import plan
    from tests.helpers import TINY_GPT2, tiny_config, write_corpus

    fit_file = tmp_path / "fit.json"
    fit_file.write_text(json.dumps(slow_link_fit.analyse(_result())))
    cfg = tiny_config(tmp_path, write_corpus(tmp_path / "corpus"),
                      model={"arch": "gpt2", "tokenizer": "byte", "config": TINY_GPT2})
    config_file = tmp_path / "run.json"
    config_file.write_text(cfg.model_dump_json())
    argv = ["--config", str(config_file), "--layout", "data=2,zero=0", "--layout", "data=1", "--device", "cpu",
            "--slow-link-fit", str(fit_file)]
    plan.main(argv + ["--link-gbps", "100"])
    out = capsys.readouterr().out
    assert "| data=2,zero=0 | 0 | 2 |" in out and "parallel.grad_compression=none" in out
    rows = plan.main(argv + ["--link-gbps", "0.0001"])  # 100 kbit/s: even a tiny model's gradients are wire-bound
    out = capsys.readouterr().out
    advice = {line.split("|")[1].strip(): line for line in out.splitlines() if "grad_compression=" in line}
    assert "grad_compression=int4" in advice["data=2,zero=0"] and "grad_compression=none" in advice["data=1"]
    assert rows[0]["data"] == 2
    with pytest.raises(SystemExit, match="--link-gbps -1.0: must be positive"):
        plan.main(argv + ["--link-gbps", "-1"])
    with pytest.raises(SystemExit, match="bench plan: .*no/such/fit.json"):
        plan.main(argv[:-2] + ["--slow-link-fit", "no/such/fit.json", "--link-gbps", "1"])


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["--links", "fast,2mbit"], r"bench slow-link: --links: unknown link '2mbit'"),
    (["--modes", "int8,int4"], r"bench slow-link: --modes int8,int4: must include none"),
    (["--steps", "0"], r"bench slow-link: --steps 0: must be at least 1"),
    (["--files", "no/such/*.txt"], r"bench slow-link: .*no/such/\*.txt")])
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(SystemExit, match=message):
        slow_link.main(argv)


@pytest.mark.subprocess
@pytest.mark.slow
def test_the_token_bucket_holds_the_rate_and_the_namespaces_go():
    import shutil
    import subprocess

    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("iproute2's `ip` / `tc` are not installed")
    try:
        hosts = slow_link.TwoHosts()
    except RuntimeError as exc:
        pytest.skip(f"this machine does not allow network namespaces ({exc})")
    try:
        hosts.shape(50)
        rate = slow_link.measure_rate(hosts, 50 * MB // 8)  # one second's worth
        assert 0.85 * 50e6 / 8 < rate < 1.1 * 50e6 / 8, rate * 8 / 1e6
        hosts.shape(None)
        assert slow_link.measure_rate(hosts, 200 * MB) > 2 * 50e6 / 8  # the bucket is gone
    finally:
        hosts.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in hosts.names)
