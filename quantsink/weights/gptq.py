"""GPTQ: column-by-column quantization with second-order error compensation.

Given a weight ``w: [out, n]`` whose first ``n_quant`` columns are to be quantized and whose
remaining columns stay in floating point (the fp16 outlier channels), and the Hessian
proxy ``H = X^T X / tokens`` of the layer input (same column order), each quantized
column's rounding error is spread over the not-yet-processed columns through the upper
Cholesky factor of ``H^-1``. The floating-point tail receives those updates too, so the
outlier channels absorb part of the error at no cost. Groups are contiguous in storage
order; with ``act_order`` columns are visited by decreasing ``diag(H)`` and the group grids
are fixed up front ("static groups"). Everything is deterministic (no random numbers), and every tensor lives on the weight's device
(only the column order, read one column at a time, stays on the CPU).
"""
from __future__ import annotations

import torch

from quantsink.weights.rtn import group_params, n_groups

BLOCK = 128  # lazy-batch width; a multiple of every supported group size


def _inverse_hessian(h: torch.Tensor, w: torch.Tensor, damp: float, n_quant: int) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H[:n_quant]) * I)^-1`` (float32).

    The mean runs over the quantized columns only: a massive outlier channel would
    otherwise inflate the damping until GPTQ degenerates into RTN. Dead columns of ``w``
    (zero input) are zeroed."""
    h = h.to(torch.float64, copy=True)
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    diag = torch.arange(h.shape[0])
    h[diag, diag] += damp * torch.diagonal(h)[:n_quant].mean()
    lower = torch.linalg.cholesky(h)
    del h  # at most two [n, n] float64 matrices alive at a time (memory of big layers)
    hinv = torch.cholesky_inverse(lower)
    del lower
    upper = torch.linalg.cholesky(hinv, upper=True)
    del hinv
    return upper.float()


def _quant_col(col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of one column ``[out]`` on a per-row grid."""
    q = torch.clamp(torch.round(col / scale) + zero, 0, maxq)
    return q, (q - zero) * scale


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, n_quant: int, bits: int, group_size: int,
                  symmetric: bool, damp: float = 0.01, act_order: bool = False,
                  clip_search: bool = True, clip_grid: int = 10, min_clip: float = 0.75
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w[:, :n_quant]``; returns ``(codes uint8 [out, n_quant], scale [out, G],
    zero [out, G], rest [out, n - n_quant])`` where ``rest`` are the compensated float columns."""
    w = w.float().clone()
    out, n = w.shape
    diag_h = torch.diagonal(h).float()
    grid_kw = dict(clip_search=clip_search, clip_grid=clip_grid, min_clip=min_clip)
    order = torch.arange(n)  # on the CPU: read column by column (no device sync per column)
    n_g = n_groups(n_quant, group_size)
    scale, zero = torch.zeros(out, n_g, device=w.device), torch.zeros(out, n_g, device=w.device)
    if act_order:  # static groups: grids from the original weights, before any update
        order[:n_quant] = torch.argsort(diag_h[:n_quant], descending=True, stable=True).cpu()
        scale, zero = group_params(w[:, :n_quant], bits, group_size, symmetric,
                                   col_weight=diag_h[:n_quant], **grid_kw)
    w, diag_h = w[:, order], diag_h[order]
    h = h[order[:, None], order] if act_order else h  # storage order: no [n, n] copy
    u = _inverse_hessian(h, w, damp, max(n_quant, 1))  # [n, n] upper
    wt = w.T.contiguous()  # [n, out]: one input column per row, contiguous
    codes_t = torch.zeros(n_quant, out, dtype=torch.uint8, device=w.device)  # storage order
    state = _State(wt, u, diag_h, order, codes_t, scale, zero)
    for i1 in range(0, n_quant, BLOCK):
        i2 = min(i1 + BLOCK, n_quant)
        err1 = _gptq_block(state, i1, i2, bits, group_size, symmetric, act_order, grid_kw)
        wt[i2:] -= u[i1:i2, i2:].T @ err1
    return codes_t.T.contiguous(), scale, zero, wt[n_quant:].T.contiguous()


class _State:
    """The tensors one GPTQ run updates in place (processing order unless noted)."""

    def __init__(self, wt, u, diag_h, order, codes_t, scale, zero) -> None:
        self.wt, self.u, self.diag_h, self.order = wt, u, diag_h, order  # wt: [n, out], u: [n, n]
        self.codes_t, self.scale, self.zero = codes_t, scale, zero  # storage order


def _gptq_block(st: _State, i1: int, i2: int, bits: int, group_size: int, symmetric: bool,
                act_order: bool, grid_kw: dict) -> torch.Tensor:
    """Quantize rows ``i1:i2`` of ``st.wt`` in place; returns the scaled errors ``[i2-i1, out]``."""
    w1, u = st.wt[i1:i2], st.u[i1:i2, i1:i2]  # views: updates land in st.wt
    err1 = torch.zeros_like(w1)
    maxq = (1 << bits) - 1
    for i in range(i2 - i1):
        c = int(st.order[i1 + i])  # storage column
        g = c // group_size
        if not act_order and c % group_size == 0:  # a new group starts: grid from current values
            j = min(i + group_size, i2 - i1)
            s, z = group_params(w1[i:j].T, bits, group_size, symmetric,
                                col_weight=st.diag_h[i1 + i:i1 + j], **grid_kw)
            st.scale[:, g], st.zero[:, g] = s[:, 0], z[:, 0]
        q, dq = _quant_col(w1[i], st.scale[:, g], st.zero[:, g], maxq)
        st.codes_t[c] = q.to(torch.uint8)
        err = (w1[i] - dq) / u[i, i]
        w1[i:] -= u[i, i:, None] * err[None]
        err1[i] = err
    return err1
