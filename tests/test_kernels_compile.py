"""The decode-attention and W4A16 kernels compile for an H100 (sm_90) without a GPU.

The interpreter does not check what only the GPU compiler sees (dot operand types, layouts,
register spills), so a subprocess without ``TRITON_INTERPRET`` compiles the kernels for sm_90.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

CONFIGS = [  # (head_dim, key bits, value bits, value groups, block_m, dtype, causal, single split,
    #          symmetric values, key outliers, sliding window / softcap / learned sinks)
    (128, 4, 4, 2, 8, "fp16", False, False, False, 0, False),
    (64, 2, 8, 1, 16, "bf16", True, True, False, 0, False),
    (64, 2, 2, 1, 16, "fp16", False, False, True, 2, False),  # the kv-int2-sink layout
    (64, 4, 4, 1, 16, "bf16", False, True, True, 0, True),  # GPT-OSS / Gemma 2 variants
]


def compile_for_sm90(D, kbits, vbits, ng, block_m, dt, causal, single, vsym, nout, variants) -> int:
    """Compile the main kernel (and the reduce) for sm_90; return the shared memory used."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from quantsink.kernels import decode_attention as mod

    cdt = {"fp16": tl.float16, "bf16": tl.bfloat16}[dt]
    consts = dict(D=D, BLOCK_M=block_m, NG=ng, GV=D // ng, BLOCK_N=64, DENSE_N=16, KBITS=kbits, VBITS=vbits,
                  HAS_BODY=True, HAS_MASK=True, IS_CAUSAL=causal, SINGLE_SPLIT=single, CDT=cdt,
                  EXP_TRICK=dt == "fp16", PREC="tf32", HILO=True, VSYM=vsym, NOUT=nout,
                  SLIDE=variants, SOFTCAP=variants, SINKL=variants)
    fn = mod._sink_decode_attention_kernel
    ptrs = {"po_ptr": "*fp32", "pm_ptr": "*fp32", "pl_ptr": "*fp32", "mask_ptr": "*u8", "kc_ptr": "*u8",
            "vc_ptr": "*u8", "ks_ptr": "*fp16", "kz_ptr": "*fp16", "vs_ptr": "*fp16", "vz_ptr": "*fp16",
            "oi_ptr": "*u8", "od_ptr": "*fp16", "sl_ptr": "*fp32"}
    sig = {n: "constexpr" if n in consts else ptrs.get(n, f"*{dt}") if n.endswith("_ptr")
           else "fp32" if n in ("qk_scale", "cap2") else "i32" for n in fn.arg_names}
    target = GPUTarget("cuda", 90, 32)
    kernel = triton.compile(ASTSource(fn, sig, consts), target=target, options=dict(num_warps=4, num_stages=2))
    red = mod._reduce_kernel
    rconsts = dict(D=D, RB=16, SPLITS_P2=8, SINKL=variants)
    rsig = {n: "constexpr" if n in rconsts else ("*fp32" if n != "out_ptr" else f"*{dt}") if n.endswith("_ptr")
            else "i32" for n in red.arg_names}
    triton.compile(ASTSource(red, rsig, rconsts), target=target, options=dict(num_warps=4))
    return kernel.metadata.shared


W4A16_CONFIGS = [  # (activation dtype, group size, block_m, has bias)
    ("fp16", 64, 16, False),
    ("bf16", 128, 64, True),
    ("fp32", 32, 32, False),
]


def compile_w4a16_for_sm90(dt, group, block_m, has_bias) -> int:
    """Compile the W4A16 kernel for sm_90 (PTX and cubin); return the shared memory used."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from quantsink.kernels import w4a16 as mod

    cdt = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[dt]
    consts = dict(GROUP=group, BLOCK_M=block_m, BLOCK_N=mod.BLOCK_N, HAS_BIAS=has_bias, CDT=cdt,
                  PREC="ieee" if dt == "fp32" else "tf32")
    ptrs = {"keep_ptr": "*i64", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "oi_ptr": "*i64",
            "ow_ptr": "*fp16", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "x_ptr": f"*{dt}"}
    fn = mod._w4a16_kernel
    sig = {n: "constexpr" if n in consts else ptrs[n] if n.endswith("_ptr") else "i32"
           for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=mod.NUM_WARPS, num_stages=mod.NUM_STAGES))
    assert "cubin" in kernel.asm
    return kernel.metadata.shared


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=170)
    if "NO_NVIDIA_BACKEND" in res.stdout:
        pytest.skip("triton has no NVIDIA backend here")
    if "OTHER_TRITON_API" in res.stdout:
        pytest.skip("this triton's ASTSource differs from the one written for (triton 3.9)")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled") == len(CONFIGS) + len(W4A16_CONFIGS), res.stdout


if __name__ == "__main__":
    import inspect

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource
    except ImportError:
        print("NO_NVIDIA_BACKEND")
        sys.exit(0)
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        print("OTHER_TRITON_API")
        sys.exit(0)
    for cfg in CONFIGS:
        print("compiled", cfg, "shared bytes", compile_for_sm90(*cfg))
    for cfg in W4A16_CONFIGS:
        print("compiled w4a16", cfg, "shared bytes", compile_w4a16_for_sm90(*cfg))
