"""Group-wise integer grids and round-to-nearest (RTN) weight quantization.

A weight ``w: [out, n]`` is cut along the input dimension into groups of ``group_size``
columns (the last group may be shorter). Each (row, group) has an fp16 ``scale`` and an
integer ``zero`` point; codes are ``clamp(round(w / scale) + zero, 0, 2**bits - 1)`` and
dequantize to ``(code - zero) * scale``. Asymmetric grids span ``[min(w, 0), max(w, 0)]``;
symmetric ones use ``zero = 2**(bits-1)`` and span ``±absmax``. With ``clip_search`` the
range is shrunk by the factor (from a grid down to ``min_clip``) that minimises the
squared error of the group, optionally weighted per column (e.g. by ``diag(H)``).
"""
from __future__ import annotations

import torch

FP16_TINY = 2.0 ** -14  # smallest normal fp16: scales never go below it


def n_groups(n: int, group_size: int) -> int:
    """Number of groups along ``n`` input channels (the last one may be partial)."""
    return (n + group_size - 1) // group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, n] -> [out, G, group_size]``, padding the last group by repeating its last column."""
    out, n = w.shape
    pad = n_groups(n, group_size) * group_size - n
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.view(out, -1, group_size)


def _grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to fp16, kept fp32) and zero point for ranges ``[lo, hi]`` (lo <= 0 <= hi)."""
    maxq = (1 << bits) - 1
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = (2 * amax / maxq).clamp_min(FP16_TINY).half().float()
        return scale, torch.full_like(scale, float(1 << (bits - 1)))
    scale = ((hi - lo) / maxq).clamp_min(FP16_TINY).half().float()
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def _fake_quant(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize grouped weights ``g: [out, G, gs]`` with ``scale, zero: [out, G]``."""
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, (1 << bits) - 1)
    return (q - zero[..., None]) * scale[..., None]


def group_params(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 clip_search: bool = True, clip_grid: int = 10, min_clip: float = 0.75,
                 col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scale, zero)``, each float32 ``[out, G]``, for ``w: [out, n]``.

    ``col_weight: [n]`` weights the squared error of each column during the clip search.
    """
    g = _grouped(w.float(), group_size)  # [out, G, gs]
    lo, hi = g.amin(-1).clamp_max(0), g.amax(-1).clamp_min(0)  # [out, G]
    scale, zero = _grid(lo, hi, bits, symmetric)
    if not clip_search or clip_grid <= 1:
        return scale, zero
    cw = torch.ones(w.shape[1], device=w.device) if col_weight is None else col_weight.float()
    cw = _grouped(cw[None].to(g.device), group_size)  # [1, G, gs]
    if w.shape[1] % group_size:  # padded tail columns must not count
        cw = cw.clone()
        cw[..., -1, w.shape[1] % group_size:] = 0
    best = ((_fake_quant(g, scale, zero, bits) - g) ** 2 * cw).sum(-1)
    for p in torch.linspace(1.0, min_clip, clip_grid)[1:].tolist():
        s, z = _grid(lo * p, hi * p, bits, symmetric)
        err = ((_fake_quant(g, s, z, bits) - g) ** 2 * cw).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_size: int) -> torch.Tensor:
    """Codes ``uint8 [out, n]`` of ``w`` on the grid ``(scale, zero)`` of shape ``[out, G]``."""
    n = w.shape[1]
    g = _grouped(w.float(), group_size)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, (1 << bits) - 1)
    return q.reshape(w.shape[0], -1)[:, :n].to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """Float32 ``[out, n]`` weights from codes ``[out, n]`` and ``scale, zero: [out, G]``."""
    out, n = codes.shape
    s = scale.float().repeat_interleave(group_size, dim=1)[:, :n]  # [out, n]
    z = zero.float().repeat_interleave(group_size, dim=1)[:, :n]
    return (codes.float() - z) * s


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 clip_search: bool = True, clip_grid: int = 10, min_clip: float = 0.75,
                 col_weight: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(codes uint8 [out, n], scale [out, G], zero [out, G])``."""
    scale, zero = group_params(w, bits, group_size, symmetric, clip_search, clip_grid,
                               min_clip, col_weight)
    return quantize_codes(w, scale, zero, bits, group_size), scale, zero
