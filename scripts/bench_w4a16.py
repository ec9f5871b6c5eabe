#!/usr/bin/env python
"""Triton W4A16 GEMM against the dense fp16/bf16 matmul on the same GPU, one run, markdown out.

Per shape (SmolLM2-135M's 576->1536 and 1536->576, 8B-class 4096->4096, 4096->14336 and
14336->4096; groups of 64, 16 fp16 outlier channels) and rows M (1, 8, 64): the kernel's error
against :func:`quantsink.weights.qmatmul.quant_linear_ref` (fp32) and the median of CUDA-event
timings of the kernel and of ``F.linear`` with the dequantized weight in the activation dtype.

    python scripts/bench_w4a16.py [--dtype float16 bfloat16] [--rows 1 8 64] [--repeats 50]

Needs a CUDA GPU (one line and exit 2 otherwise). Never imported by the package or the tests.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = ((576, 1536), (1536, 576), (4096, 4096), (4096, 14336), (14336, 4096))  # (in, out)
GROUP, OUTLIERS = 64, 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=50)
    return p.parse_args(argv)


def cuda_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn()`` by CUDA events, after warm-up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_args(inp: int, out: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The kernel's tensors of a random RTN layer (CUDA) and its dequantized fp32 weight."""
    from quantsink.weights.linear import QuantLinear
    from quantsink.weights.outliers import split_columns
    from quantsink.weights.rtn import rtn_quantize

    g = torch.Generator().manual_seed(inp * 7 + out)
    w = torch.randn(out, inp, generator=g) * 0.05
    idx = torch.sort(torch.randperm(inp, generator=g)[:OUTLIERS]).values
    keep = split_columns(inp, idx)
    codes, s, z = rtn_quantize(w[:, keep], 4, GROUP, False, clip_search=False)
    layer = QuantLinear.from_quantized(codes, s, z, idx, w[:, idx], 4, GROUP, None)
    tensors = [layer.weight_packed, layer.weight_scale, layer.weight_zero_point, keep,
               layer.outlier_idx, layer.outlier_weight]
    return [t.cuda() for t in tensors], layer.dequantize().cuda()


def row(inp: int, out: int, m: int, dtype: torch.dtype, repeats: int) -> str:
    from quantsink.kernels.w4a16 import w4a16_linear
    from quantsink.weights.qmatmul import quant_linear_ref

    args, dense_w = make_args(inp, out)
    x = torch.randn(m, inp, device="cuda").to(dtype)
    ref = quant_linear_ref(x.float(), *args, None, 4, GROUP)
    got = w4a16_linear(x, *args, None, GROUP)
    err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
    w = dense_w.to(dtype)
    t_kernel = cuda_ms(lambda: w4a16_linear(x, *args, None, GROUP), repeats)
    t_dense = cuda_ms(lambda: F.linear(x, w), repeats)
    return (f"| {inp}->{out} | {m} | {str(dtype)[6:]} | {err:.1e} | {t_kernel * 1e3:.1f} | "
            f"{t_dense * 1e3:.1f} | {t_dense / t_kernel:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_w4a16 needs a CUDA GPU; torch sees none", file=sys.stderr)
        return 2
    import triton

    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"groups of {GROUP}, {OUTLIERS} fp16 outlier channels\n")
    print("| shape (in->out) | M | dtype | max rel. err vs fp32 ref | W4A16 us | dense us | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name in args.dtype:
        for inp, out in SHAPES:
            for m in args.rows:
                print(row(inp, out, m, getattr(torch, name), args.repeats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
