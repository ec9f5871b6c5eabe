"""Per-channel min/max of keys or values with the attention sinks left out.

Which leading positions are sinks is known only after the whole pass, so the first
``lead`` positions are tracked one by one and the rest together; content-sink occurrences
(keys that drew a sink's share of attention in that layer) are left out as they come.
"""
from __future__ import annotations

import torch

_INF = float("inf")


class RangeStats:
    """Running per-channel ranges of ``[B, Hkv, L, D]`` tensors over calibration batches."""

    def __init__(self, lead: int) -> None:
        self.lead = lead
        self.lead_min: torch.Tensor | None = None  # [P, Hkv, D]
        self.lead_max: torch.Tensor | None = None
        self.body_min: torch.Tensor | None = None  # [Hkv, D]
        self.body_max: torch.Tensor | None = None

    def update(self, x: torch.Tensor, exclude: torch.Tensor) -> None:
        """x: [B, Hkv, L, D] float32; exclude: [B, L] bool occurrences to leave out."""
        p = min(self.lead, x.shape[2])
        keep = (~exclude)[:, None, :, None]  # [B, 1, L, 1]
        lo = torch.where(keep, x, _INF)
        hi = torch.where(keep, x, -_INF)
        lead_lo = lo[:, :, :p].amin(0).transpose(0, 1)  # [P, Hkv, D]
        lead_hi = hi[:, :, :p].amax(0).transpose(0, 1)
        if self.lead_min is None:
            hkv, d = x.shape[1], x.shape[3]
            self.lead_min = torch.full((self.lead, hkv, d), _INF)
            self.lead_max = torch.full((self.lead, hkv, d), -_INF)
            self.body_min = torch.full((hkv, d), _INF)
            self.body_max = torch.full((hkv, d), -_INF)
        self.lead_min[:p] = torch.minimum(self.lead_min[:p], lead_lo)
        self.lead_max[:p] = torch.maximum(self.lead_max[:p], lead_hi)
        if x.shape[2] > p:
            self.body_min = torch.minimum(self.body_min, lo[:, :, p:].amin(dim=(0, 2)))
            self.body_max = torch.maximum(self.body_max, hi[:, :, p:].amax(dim=(0, 2)))

    def lead_absmax(self) -> torch.Tensor:
        """[P, Hkv, D] largest |x| seen at each leading position (0 where nothing was seen)."""
        mag = torch.maximum(self.lead_min.abs(), self.lead_max.abs())
        return torch.where(torch.isinf(mag), torch.zeros_like(mag), mag)

    def finalize(self, exclude_positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max), each [Hkv, D] float32, over all kept tokens except ``exclude_positions``."""
        keep = [p for p in range(self.lead) if p not in set(exclude_positions)]
        lo = torch.cat([self.body_min[None], self.lead_min[keep]]).amin(0)
        hi = torch.cat([self.body_max[None], self.lead_max[keep]]).amax(0)
        empty = torch.isinf(lo) | torch.isinf(hi)
        lo = torch.where(empty, torch.zeros_like(lo), lo)
        hi = torch.where(empty, torch.zeros_like(hi), hi)
        return lo.float().contiguous(), hi.float().contiguous()
