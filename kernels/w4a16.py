"""Triton W4A16 GEMM over a QuantLinear's own buffers, with the fp16 outlier columns fused.

``y = x[:, keep] @ ((code - zero) * scale).T + x[:, outlier_idx] @ outlier_weight.T + bias``,
the spec being :func:`quantsink.weights.qmatmul.quant_linear_ref`. One launch of
:func:`_w4a16_kernel`, grid ``(N / BLOCK_N, M / BLOCK_M, splits)``: each program owns a
``[BLOCK_M, BLOCK_N]`` output tile and a contiguous range of weight groups (split-K over
groups for decode, where ``N / BLOCK_N`` programs alone cannot fill the GPU).

- Per group: x's kept channels are gathered through ``keep_idx`` (``[BLOCK_M, G]``), the
  codes unpacked from the int32 words (code ``i`` at bits ``4 * (i % 8)`` of word ``i // 8``),
  ``code - zero`` is an exact small integer in the activation dtype, so one ``tl.dot`` per group
  accumulates in fp32 and the fp16 scale is applied to the fp32 partial product.
- The partial last group is masked (x = 0 beyond ``n_q``); ``N`` and ``M`` tails are masked.
- The split that owns group 0 adds the outlier columns (fp32 FMAs, one column at a time) and
  the bias. With several splits the fp32 partials are summed by torch.

The public wrapper is :func:`w4a16_linear`. CPU tensors need ``TRITON_INTERPRET=1`` set before
triton is imported (fp16/fp32 only there). Untuned: no GPU was lent when it was written.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from quantsink.errors import QuantsinkError, check

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK_N = 64
NUM_WARPS, NUM_STAGES = 4, 2  # untuned guesses
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _w4a16_kernel(x_ptr, keep_ptr, w_ptr, s_ptr, z_ptr, oi_ptr, ow_ptr, b_ptr, y_ptr,
                  M, N, NQ, KO, GROUPS, PER_SPLIT, stride_xm, stride_wn, stride_gn, stride_on,
                  stride_ys, stride_ym, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, CDT: tl.constexpr,
                  PREC: tl.constexpr):
    """Program (N tile, M tile, split): groups [split * PER_SPLIT, ...) of one output tile."""
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64) * stride_xm
    w_cols = w_ptr + rn.to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    g_lo = split * PER_SPLIT
    for g in range(g_lo, tl.minimum(GROUPS, g_lo + PER_SPLIT)):
        k = g * GROUP + tl.arange(0, GROUP)  # kept-channel index
        k_ok = k < NQ
        src = tl.load(keep_ptr + k, mask=k_ok, other=0)  # the input channel it reads
        xt = tl.load(x_rows[:, None] + src[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        words = tl.load(w_cols[None, :] + (k // 8)[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0)  # [GROUP, BLOCK_N] int32
        codes = (words >> ((k % 8) * 4)[:, None]) & 15
        zp = tl.load(z_ptr + rn * stride_gn + g, mask=n_ok, other=0).to(tl.int32)
        sc = tl.load(s_ptr + rn * stride_gn + g, mask=n_ok, other=0.0).to(tl.float32)
        wq = (codes - zp[None, :]).to(CDT)  # exact: |code - zero| <= 15
        part = tl.dot(xt.to(CDT), wq, input_precision=PREC)  # [BLOCK_M, BLOCK_N] fp32
        acc += part * sc[None, :]
    if split == 0:
        for j in range(KO):  # fp16 outlier columns, fp32 FMAs
            c = tl.load(oi_ptr + j)
            xo = tl.load(x_rows + c, mask=m_ok, other=0.0).to(tl.float32)
            wo = tl.load(ow_ptr + rn * stride_on + j, mask=n_ok, other=0.0).to(tl.float32)
            acc += xo[:, None] * wo[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + split * stride_ys + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _check(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
           weight_zero_point: torch.Tensor, keep_idx: torch.Tensor, outlier_idx: torch.Tensor,
           outlier_weight: torch.Tensor, group_size: int) -> None:
    """Raise :class:`QuantsinkError` naming the first input that breaks the contract."""
    n, n_q = weight_packed.shape[0], keep_idx.numel()
    check(x.dtype in _TL, f"x dtype {x.dtype} is not supported; allowed: fp16, bf16, fp32")
    check(not (INTERPRET and x.dtype == torch.bfloat16),
          "bf16 does not run under TRITON_INTERPRET=1; use fp16/fp32 on CPU or a CUDA device")
    check(group_size in (16, 32, 64, 128, 256),
          f"group_size {group_size} is not supported by the triton kernel; allowed: 16..256 (powers of 2)")
    check(weight_packed.dtype == torch.int32 and weight_packed.shape[1] * 8 >= n_q,
          f"weight_packed must be int32 [out, >= {-(-n_q // 8)}], got {weight_packed.dtype} "
          f"{tuple(weight_packed.shape)}")
    groups = -(-n_q // group_size)
    check(tuple(weight_scale.shape) == (n, groups) == tuple(weight_zero_point.shape),
          f"weight_scale and weight_zero_point must be [{n}, {groups}], got "
          f"{tuple(weight_scale.shape)} and {tuple(weight_zero_point.shape)}")
    check(tuple(outlier_weight.shape) == (n, outlier_idx.numel()),
          f"outlier_weight must be [{n}, {outlier_idx.numel()}], got {tuple(outlier_weight.shape)}")
    for name, t in (("weight_packed", weight_packed), ("weight_scale", weight_scale),
                    ("keep_idx", keep_idx), ("outlier_weight", outlier_weight)):
        check(t.device == x.device, f"{name} is on {t.device}, x on {x.device}; allowed: one device")


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(groups: int, programs: int, device: torch.device) -> int:
    """Split-K: about two programs per SM (untuned), at least 2 groups per split."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(2 * sms // max(programs, 1), groups // 2, 64))


def w4a16_linear(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                 weight_zero_point: torch.Tensor, keep_idx: torch.Tensor, outlier_idx: torch.Tensor,
                 outlier_weight: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                 num_splits: int | None = None) -> torch.Tensor:
    """Triton version of :func:`quantsink.weights.qmatmul.quant_linear_ref` for 4-bit weights.

    ``x: [..., in]`` fp16/bf16/fp32 -> ``[..., out]`` in ``x.dtype``. Raises
    :class:`~quantsink.errors.QuantsinkError` on inputs that break the contract.
    """
    if x.device.type != "cuda" and not INTERPRET:
        raise QuantsinkError(f"the triton W4A16 kernel needs CUDA tensors or TRITON_INTERPRET=1 set "
                             f"before triton is imported; got {x.device} tensors")
    _check(x, weight_packed, weight_scale, weight_zero_point, keep_idx, outlier_idx,
           outlier_weight, group_size)
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    (m, n), n_q = (x2.shape[0], weight_packed.shape[0]), keep_idx.numel()
    groups = -(-n_q // group_size)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    grid_mn = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, block_m))
    splits = num_splits or _splits(groups, grid_mn[0] * grid_mn[1], x.device)
    per = -(-max(groups, 1) // max(1, min(splits, max(groups, 1))))
    splits = -(-max(groups, 1) // per)
    y = torch.empty(splits, m, n, device=x.device, dtype=x.dtype if splits == 1 else torch.float32)
    ow = outlier_weight.contiguous()
    b = bias if bias is not None else ow
    _w4a16_kernel[grid_mn + (splits,)](
        x2, keep_idx.contiguous(), weight_packed.contiguous(), weight_scale.contiguous(),
        weight_zero_point.contiguous(), outlier_idx.contiguous(), ow, b, y,
        m, n, n_q, outlier_idx.numel(), groups, per, x2.stride(0), weight_packed.shape[1],
        weight_scale.shape[1], max(ow.shape[1], 1), m * n, n,
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=BLOCK_N, HAS_BIAS=bias is not None,
        CDT=_TL[x.dtype], PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    out = y[0] if splits == 1 else y.sum(0).to(x.dtype)
    return out.reshape(*x.shape[:-1], n)
