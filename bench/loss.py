"""The output layer and cross entropy's memory: today's full-logits path (``x @ W^T``, then
``parallel.cross_entropy``: an fp32 copy, the softmax kept for the backward) against the chunked one
(``parallel.chunked_cross_entropy``, ``parallel.loss_chunk_tokens``), traced on the meta device.

    python -m bench loss --out bench/results/loss-cpu

Peak: the most bytes alive above what was alive before the loss's forward (the hidden states and the weight),
through its forward and backward, the weight's gradient included (both paths make it), counted per storage by
``bench.plan_trace.LiveBytes``. Gradients: on the CPU at a smaller size, the chunked loss, grad_hidden and
grad_W against ``torch.nn.functional.cross_entropy`` on full fp64 logits; and the wall time of both paths."""

from __future__ import annotations

import argparse
import time

DTYPES = ("fp32", "bf16")


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[name]


def _losses(chunk: int):
    """The per-token loss of one path: 0 = today's full logits."""
    from parallel.chunked_cross_entropy import chunked_head_cross_entropy
    from parallel.cross_entropy import vocab_parallel_cross_entropy

    if chunk == 0:
        return lambda x, w, t: vocab_parallel_cross_entropy(x @ w.t(), t)
    return lambda x, w, t: chunked_head_cross_entropy(x, w, t, chunk_tokens=chunk)


def traced_peak(chunk: int, tokens: int, vocab: int, hidden: int, dtype: str) -> int:
    """Peak bytes of one forward + backward of the mean loss, above the hidden states and weight (meta device)."""
    import torch

    from bench.plan_trace import LiveBytes

    x = torch.zeros(tokens, hidden, dtype=_dtype(dtype), device="meta", requires_grad=True)
    w = torch.zeros(vocab, hidden, dtype=_dtype(dtype), device="meta", requires_grad=True)
    t = torch.zeros(tokens, dtype=torch.long, device="meta")
    live = LiveBytes()
    with live:
        start = live.reset_peak()
        _losses(chunk)(x, w, t).mean().backward()
        return live.peak - start


def gradient_errors(chunk: int, tokens: int, vocab: int, hidden: int, seed: int = 0) -> dict:
    """Relative errors (2-norm) of the chunked loss and gradients in fp32 against fp64
    ``F.cross_entropy`` on full logits, with an incoming gradient that is not 1, a bias and ignored targets."""
    import torch
    import torch.nn.functional as F

    from parallel.chunked_cross_entropy import chunked_head_cross_entropy

    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(tokens, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * hidden ** -0.5
    b, scale = torch.randn(vocab, generator=g) * 0.1, torch.rand(tokens, generator=g, dtype=torch.float64)
    t = torch.randint(0, vocab, (tokens,), generator=g)
    t[::11] = -100
    ref = [v.double().requires_grad_() for v in (x, w, b)]
    ref_loss = F.cross_entropy(ref[0] @ ref[1].t() + ref[2], t, reduction="none")
    (ref_loss * scale).sum().backward()
    got = [v.clone().requires_grad_() for v in (x, w, b)]
    loss = chunked_head_cross_entropy(got[0], got[1], t, got[2], chunk_tokens=chunk)
    (loss.double() * scale).sum().backward()

    def rel(a, r):
        return float((a.double() - r).norm() / r.norm())

    return {"loss": rel(loss.detach(), ref_loss.detach()), "grad_hidden": rel(got[0].grad, ref[0].grad),
            "grad_weight": rel(got[1].grad, ref[1].grad), "grad_bias": rel(got[2].grad, ref[2].grad)}


def wall_seconds(chunk: int, tokens: int, vocab: int, hidden: int, repeats: int = 3) -> float:
    """Median seconds of one fp32 forward + backward on the CPU."""
    import statistics

    import torch

    x = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * hidden ** -0.5).requires_grad_()
    t = torch.randint(0, vocab, (tokens,))
    seconds = []
    for _ in range(repeats + 1):
        x.grad = w.grad = None
        started = time.perf_counter()
        _losses(chunk)(x, w, t).mean().backward()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:])


def run(vocab: int, tokens: int, hiddens: list[int], chunks: list[int], check: tuple[int, int, int, int]) -> dict:
    from bench.machine import describe

    rows = []
    for hidden in hiddens:
        for dtype in DTYPES:
            today = traced_peak(0, tokens, vocab, hidden, dtype)
            for chunk in chunks:
                peak = traced_peak(chunk, tokens, vocab, hidden, dtype)
                rows.append({"hidden": hidden, "dtype": dtype, "chunk_tokens": chunk, "today_bytes": today,
                             "chunked_bytes": peak, "ratio": peak / today,
                             "weight_grad_bytes": vocab * hidden * _dtype(dtype).itemsize})
    c_tokens, c_vocab, c_hidden, c_chunk = check
    return {"machine": describe(), "vocab": vocab, "tokens": tokens, "rows": rows,
            "check": {"tokens": c_tokens, "vocab": c_vocab, "hidden": c_hidden, "chunk_tokens": c_chunk,
                      "rel": gradient_errors(c_chunk, c_tokens, c_vocab, c_hidden),
                      "today_s": wall_seconds(0, c_tokens, c_vocab, c_hidden),
                      "chunked_s": wall_seconds(c_chunk, c_tokens, c_vocab, c_hidden)}}


def report(result: dict) -> str:
    machine, check = result["machine"], result["check"]
    lines = [f"# Output layer + cross entropy: {result['vocab']:,}-token vocabulary, {result['tokens']:,} tokens",
             "", f"{machine['cpu']}, torch {machine['torch']}, {machine['date']}. Peak bytes above the hidden "
             "states and weight through forward and backward (meta-device trace), the weight's gradient included.",
             "", "| hidden | dtype | chunk tokens | today GiB | chunked GiB | ratio | of which dW GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['hidden']} | {r['dtype']} | {r['chunk_tokens']} | {r['today_bytes'] / 2**30:.2f} | "
                     f"{r['chunked_bytes'] / 2**30:.2f} | {r['ratio']:.3f} | {r['weight_grad_bytes'] / 2**30:.2f} |")
    rel = check["rel"]
    lines += ["", f"Gradients (fp32, {check['tokens']} tokens x {check['vocab']} vocabulary x {check['hidden']} "
              f"hidden, chunks of {check['chunk_tokens']}, bias, every 11th target ignored) against fp64 "
              f"F.cross_entropy on "
              f"full logits, relative 2-norm: loss {rel['loss']:.1e}, grad_hidden {rel['grad_hidden']:.1e}, "
              f"grad_W {rel['grad_weight']:.1e}, grad_bias {rel['grad_bias']:.1e}.", "",
              f"CPU wall time of forward + backward there: today {check['today_s']:.3f} s, chunked "
              f"{check['chunked_s']:.3f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench loss", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch")
    parser.add_argument("--hidden", type=int, nargs="+", default=[896, 4096])
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024, 2048],
                        help="parallel.loss_chunk_tokens values (default 1024 is the config's)")
    parser.add_argument("--check", type=int, nargs=4, default=[1024, 32_000, 256, 256],
                        metavar=("TOKENS", "VOCAB", "HIDDEN", "CHUNK"), help="the real CPU gradient check's sizes")
    parser.add_argument("--out", help="directory for results.json and report.md")
    args = parser.parse_args(argv)
    sizes = [args.vocab, args.tokens, *args.hidden, *args.chunks, *args.check]
    if min(sizes) < 1:
        from bench.cli import fail

        fail("bench loss", f"every size must be positive, got {sizes}")
    from bench.machine import publish

    result = run(args.vocab, args.tokens, args.hidden, args.chunks, tuple(args.check))
    publish(result, report(result), args.out)
