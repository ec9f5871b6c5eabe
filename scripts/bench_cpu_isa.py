#!/usr/bin/env python
"""The C++ CPU kernels on every ISA level this host runs, each against dense fp32 torch, one thread.

Per level (``avx512`` / ``avx2`` / ``portable``, see :mod:`quantsink.kernels.cpu_ext`):

- ``w4_linear`` at 1 and 8 rows on the SmolLM2-135M shapes 576->1536, 1536->576, 576->576
  (groups of 64, 16 fp16 outlier channels) vs ``F.linear`` with the fp32 weight;
- ``sink_decode_cpu`` at T = 512 / 2048 / 8192 body tokens (9 query / 3 KV heads, D = 64, 4-bit
  keys and values, 4 sinks, a 64-token window) vs fp32 attention over the dense K / V;
- ``int8_rows`` at 1 row of a 49152 x 576 int8 matrix vs ``x @ W.T`` with the fp32 weight.

Times are medians of ``--repeats`` calls after warm-up; the dense column is measured in the
same run. For an AVX2 baseline of the dense ops on an AVX-512 host, set (before torch starts)
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``; the header
prints them and torch's CPU capability. Prints a markdown table headed by the CPU model, its features and the command.

    OMP_NUM_THREADS=1 python scripts/bench_cpu_isa.py [--repeats 50] [--levels avx2 portable]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from quantsink.kernels import cpu_ext
from quantsink.kernels.cpu_decode import sink_decode_cpu
from quantsink.kv.primitives import quantize_keys, quantize_values

W4_SHAPES = ((576, 1536), (1536, 576), (576, 576))  # (in, out)
GROUP, OUTLIERS = 64, 16
CONTEXTS = (512, 2048, 8192)
VOCAB, HIDDEN = 49152, 576
DENSE_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "QUANTSINK_CPU_ISA")


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def w4_case(inp: int, out: int, rows: int, gen: torch.Generator) -> tuple[Callable, Callable]:
    """(kernel call, dense call) for one W4A32 layer with the stored-buffer layout of QuantLinear."""
    nq = inp - OUTLIERS
    ngroups = (nq + GROUP - 1) // GROUP
    words = (ngroups * GROUP + 7) // 8  # int32 words of 8 codes per row
    packed = torch.randint(-2 ** 31, 2 ** 31 - 1, (out, words), dtype=torch.int32, generator=gen)
    scale = (torch.rand(out, ngroups, generator=gen) * 0.01 + 0.001).half()
    zero = torch.randint(0, 16, (out, ngroups), dtype=torch.uint8, generator=gen)
    wo = torch.randn(out, OUTLIERS, generator=gen).half()
    gather = torch.randperm(inp, generator=gen)
    x = torch.randn(rows, inp, generator=gen)
    w = torch.randn(out, inp, generator=gen)
    ext, empty = cpu_ext.extension(), torch.empty(0)
    return (lambda isa: ext.w4_linear(x, gather, nq, GROUP, [packed], [scale], [zero], [wo], [empty], isa),
            lambda: F.linear(x, w))


def attention_case(T: int, gen: torch.Generator) -> tuple[Callable, Callable]:
    """(kernel call, dense call) for one decode step: B = 1, 9 / 3 heads, D = 64, 4-bit body."""
    B, Hkv, g, D, S0, W = 1, 3, 3, 64, 4, 64
    q = torch.randn(B, Hkv * g, 1, D, generator=gen)
    sk, sv, wk, wv = (torch.randn(B, Hkv, n, D, generator=gen) for n in (S0, S0, W, W))
    body_k = quantize_keys(torch.randn(B, Hkv, T, D, generator=gen), 4, 64)
    body_v = quantize_values(torch.randn(B, Hkv, T, D, generator=gen), 4, 64)
    k = torch.randn(B, Hkv, S0 + T + W, D, generator=gen)
    v = torch.randn(B, Hkv, S0 + T + W, D, generator=gen)
    qf, scale = q.reshape(B, Hkv, g, D), D ** -0.5

    def dense() -> torch.Tensor:
        p = torch.softmax(qf @ k.transpose(-1, -2) * scale, dim=-1)
        return p @ v

    return (lambda isa: sink_decode_cpu(q, sk, sv, body_k, body_v, wk, wv, scale, isa=isa), dense)


def int8_case(gen: torch.Generator) -> tuple[Callable, Callable]:
    """(kernel call, dense call) for the lm_head product at one row."""
    w8 = torch.randint(-127, 128, (VOCAB, HIDDEN), dtype=torch.int8, generator=gen)
    s = (torch.rand(VOCAB, generator=gen) * 0.01).half()
    x = torch.randn(1, HIDDEN, generator=gen)
    wf = w8.float() * s.float()[:, None]
    ext = cpu_ext.extension()
    return (lambda isa: ext.int8_rows(x, w8, s, isa), lambda: x @ wf.T)


def cases() -> list[tuple[str, str, Callable, Callable]]:
    """(kernel, shape, kernel call taking the level, dense call) for every benchmarked case."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for rows in (1, 8):
        for inp, n in W4_SHAPES:
            out.append(("w4_linear", f"{rows} x {inp}->{n}", *w4_case(inp, n, rows, gen)))
    for T in CONTEXTS:
        out.append(("sink_decode_cpu", f"T={T}, 9q/3kv, D=64, 4-bit", *attention_case(T, gen)))
    out.append(("int8_rows", f"1 x {VOCAB}x{HIDDEN}", *int8_case(gen)))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--levels", nargs="+", default=None, help="default: every level this host runs")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rep = cpu_ext.report()
    levels = a.levels or rep["runnable"]
    rows = []
    for kernel, shape, run, dense in cases():
        dense_ms = median_ms(dense, a.repeats)
        for lv in levels:
            ms = median_ms(lambda: run(lv), a.repeats)
            rows.append(f"| {lv} | {kernel} | {shape} | {ms:.3f} | {dense_ms:.3f} | {dense_ms / ms:.2f}x |")
    features = ", ".join(f for f, on in rep["features"].items() if on) or "none"
    print(f"CPU: {rep['cpu']} ({rep['machine']}); features: {features}; levels run: {', '.join(levels)}; "
          f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}), 1 thread, "
          f"median of {a.repeats}; env: {' '.join(f'{k}={os.environ[k]}' for k in DENSE_ENV if k in os.environ) or '-'}")
    print(f"Command: `OMP_NUM_THREADS=1 python {' '.join(sys.argv)}`\n")
    print("| level | kernel | shape | ms | dense fp32 torch ms | speed-up |")
    print("|---|---|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
