"""Per-channel fp16 key outliers (dense-and-sparse keys, after KVQuant).

At 2 bits one extreme token stretches the min/max range of its channel over a whole key
group. With ``k`` outliers per channel and group, the ``k`` tokens whose removal shrinks
the channel's range the most are left out of the range; they are coded like the rest
(clamped) and the cache keeps, per (group, channel), their slot in the group (uint8 for
groups of up to 256 tokens, int16 above: :func:`slot_dtype`) and
the fp16 correction ``x - dequantized(x)``. Dequantization adds the corrections back, so
those entries are exact up to fp16 rounding.

Cost per key element: ``k * (8 + 16) / G`` bits (groups of 128 tokens, one outlier: 0.19).
Shapes: grouped keys ``[B, H, n / G, G, D]``; ``idx`` and ``delta`` ``[B, H, n / G, k, D]``.
"""
from __future__ import annotations

import torch


def slot_dtype(group_size: int) -> torch.dtype:
    """The integer type that holds every slot of a group of ``group_size`` tokens."""
    return torch.uint8 if group_size <= 256 else torch.int16


def select(x: torch.Tensor, k: int) -> torch.Tensor:
    """Slots (dim 3) of the ``k`` outliers per group and channel of grouped keys ``x``."""
    taken = torch.zeros_like(x, dtype=torch.bool)
    picks = []
    for _ in range(k):  # greedily drop the min or the max, whichever shrinks the range more
        low, high = x.masked_fill(taken, float("inf")), x.masked_fill(taken, float("-inf"))
        i_lo, i_hi = low.argmin(3, keepdim=True), high.argmax(3, keepdim=True)
        lo, hi = low.gather(3, i_lo), high.gather(3, i_hi)
        lo2 = low.scatter(3, i_lo, float("inf")).amin(3, keepdim=True)
        hi2 = high.scatter(3, i_hi, float("-inf")).amax(3, keepdim=True)
        pick = torch.where(hi2 - lo < hi - lo2, i_hi, i_lo)  # [B, H, n/G, 1, D]
        taken.scatter_(3, pick, True)
        picks.append(pick)
    return torch.cat(picks, dim=3)


def inlier_range(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group and channel min and max of ``x`` without the outlier slots ``idx``."""
    taken = torch.zeros_like(x, dtype=torch.bool).scatter_(3, idx, True)
    lo = x.masked_fill(taken, float("inf")).amin(3, keepdim=True)
    hi = x.masked_fill(taken, float("-inf")).amax(3, keepdim=True)
    return lo, hi


def corrections(x: torch.Tensor, approx: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """fp16 ``x - approx`` at the outlier slots: ``[B, H, n/G, k, D]``."""
    return (x - approx).gather(3, idx).to(torch.float16)


def apply(approx: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Add the corrections back into grouped dequantized keys (returns a new tensor)."""
    return approx.scatter_add(3, idx.long(), delta.to(approx.dtype))
