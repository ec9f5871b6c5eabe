"""The torch reference of a packed Linear: the spec every weight kernel is tested against.

``y = x[..., keep] @ Wq.T + x[..., outlier_idx] @ Wo.T + bias`` with ``Wq = (code - zero) *
scale`` (groups of ``group_size`` along the ``n_q`` kept channels, the last one may be
partial) and ``Wo`` the fp16 outlier columns. The weight is dequantized ``tile`` output rows
at a time and never kept: memory is one tile, whatever the layer size.

Precision: with ``compute_dtype=None`` everything is float32 (the dequantized weight is
exact: a 4- or 8-bit integer times an fp16 scale fits in fp32) and the result is rounded
to ``x.dtype`` once. ``compute_dtype=torch.bfloat16`` (the CPU path for many rows) rounds
x and each weight tile to bf16 and multiplies them in bf16 (fp32 accumulation); the fp16
outlier columns always stay in float32.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

TILE_ELEMENTS = 1 << 20  # dequantized elements per tile (4 MiB in fp32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """All codes of int32 words ``[rows, words]`` as uint8 ``[rows, words * 32 // bits]``.

    Little-endian bytes: byte ``j`` of a row holds codes ``2j`` (low nibble) and ``2j + 1``
    for 4 bits, code ``j`` for 8 bits (see :mod:`quantsink.weights.pack`).
    """
    if sys.byteorder != "little":  # the byte view below assumes little-endian words
        from quantsink.weights.pack import unpack_codes

        return unpack_codes(packed, bits, packed.shape[1] * 32 // bits)
    b = packed.contiguous().view(torch.uint8)  # [rows, 4 * words]
    if bits == 8:
        return b
    return torch.stack([b & 15, b >> 4], dim=-1).view(b.shape[0], -1)


def dequantize_rows(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    group_size: int, n_q: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(code - zero) * scale`` of rows ``[rows, n_q]`` in ``dtype`` (exact in float32)."""
    rows, groups = scale.shape
    codes = unpack_rows(packed, bits)  # [rows, >= n_q]
    width = groups * group_size
    if codes.shape[1] < width:
        codes = F.pad(codes, (0, width - codes.shape[1]))
    w = codes[:, :width].view(rows, groups, group_size).to(torch.float32)
    w.sub_(zero.to(torch.float32)[:, :, None]).mul_(scale.to(torch.float32)[:, :, None])  # exact
    return w.view(rows, width)[:, :n_q].to(dtype)


def tile_rows(in_features: int) -> int:
    """Output rows per dequantized tile (a multiple of 16)."""
    return max(16, (TILE_ELEMENTS // max(in_features, 1)) // 16 * 16)


def quant_linear_ref(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                     weight_zero_point: torch.Tensor, keep_idx: torch.Tensor,
                     outlier_idx: torch.Tensor, outlier_weight: torch.Tensor,
                     bias: torch.Tensor | None, bits: int, group_size: int,
                     compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x: [..., in] -> [..., out]`` in ``x.dtype`` (see the module docstring)."""
    out_features, n_q = weight_packed.shape[0], keep_idx.numel()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, in]
    xq = x2.index_select(1, keep_idx).to(compute_dtype or torch.float32)  # [M, n_q]
    y = torch.empty(x2.shape[0], out_features, dtype=torch.float32, device=x.device)
    step = tile_rows(n_q)
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        w = dequantize_rows(weight_packed[r0:r1], weight_scale[r0:r1], weight_zero_point[r0:r1],
                            bits, group_size, n_q, xq.dtype)  # [tile, n_q]
        y[:, r0:r1] = xq @ w.T
    if outlier_idx.numel():
        xo = x2.index_select(1, outlier_idx).float()  # [M, k]
        y.addmm_(xo, outlier_weight.float().T)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*lead, out_features)
