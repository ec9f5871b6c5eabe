"""Per-channel key magnitudes with the attention sinks left out (for the key-channel figure).

Which leading positions are sinks is known only after the whole pass, so the first
``lead`` positions are tracked one by one and the rest together; content-sink occurrences
(keys that drew a sink's share of attention in that layer) are left out as they come.
"""
from __future__ import annotations

import torch


class KeyMagnitudes:
    """Running per-channel ``max |key|`` of ``[B, Hkv, L, D]`` tensors over calibration batches."""

    def __init__(self, lead: int) -> None:
        self.lead = lead
        self.lead_max: torch.Tensor | None = None  # [P, Hkv, D]
        self.body_max: torch.Tensor | None = None  # [Hkv, D]

    def update(self, x: torch.Tensor, exclude: torch.Tensor) -> None:
        """x: [B, Hkv, L, D] float32; exclude: [B, L] bool occurrences to leave out."""
        p = min(self.lead, x.shape[2])
        mag = x.abs().masked_fill(exclude[:, None, :, None], 0.0)  # [B, Hkv, L, D]
        if self.lead_max is None:
            self.lead_max = torch.zeros(self.lead, x.shape[1], x.shape[3])
            self.body_max = torch.zeros(x.shape[1], x.shape[3])
        self.lead_max[:p] = torch.maximum(self.lead_max[:p], mag[:, :, :p].amax(0).transpose(0, 1))
        if x.shape[2] > p:
            self.body_max = torch.maximum(self.body_max, mag[:, :, p:].amax(dim=(0, 2)))

    def lead_absmax(self) -> torch.Tensor:
        """[P, Hkv, D] largest |key| seen at each leading position (0 where nothing was seen)."""
        return self.lead_max.clone()

    def finalize(self, exclude_positions: list[int]) -> torch.Tensor:
        """[Hkv, D] float32 largest |key| over all kept tokens except ``exclude_positions``."""
        keep = [p for p in range(self.lead) if p not in set(exclude_positions)]
        return torch.cat([self.body_max[None], self.lead_max[keep]]).amax(0).float().contiguous()
