"""Choosing the input channels of a Linear layer that stay in fp16.

A channel whose activations are large (the massive-activation channels of the residual
stream, or the spikes that feed ``down_proj``) dominates the layer's output error when
its weight column is rounded. The score of input channel ``j`` is
``act_absmax[j] * ||W[:, j]||_2`` (``"absmax_x_norm"``) or ``act_absmax[j]`` alone
(``"absmax"``); channels named in ``forced`` (massive-activation channels found by
calibration) are taken first, then the highest scores fill the remaining slots.
"""
from __future__ import annotations

import torch

from quantsink.errors import check


def outlier_count(requested: int, in_features: int) -> int:
    """Outlier channels actually kept for a layer with ``in_features`` inputs (at most half)."""
    return min(requested, in_features // 2)


def channel_scores(act_absmax: torch.Tensor, weight: torch.Tensor,
                   method: str = "absmax_x_norm") -> torch.Tensor:
    """Score ``[in]`` of each input channel; ``weight: [out, in]``, ``act_absmax: [in]``."""
    check(act_absmax.shape == (weight.shape[1],),
          f"act_absmax has shape {tuple(act_absmax.shape)}, expected ({weight.shape[1]},)")
    a = act_absmax.float().abs()
    if method == "absmax":
        return a
    check(method == "absmax_x_norm",
          f"outlier score {method!r} is not supported; allowed: ['absmax_x_norm', 'absmax']")
    return a * weight.float().norm(dim=0)


def select_outliers(scores: torch.Tensor, k: int, forced: list[int] | None = None) -> torch.Tensor:
    """Indices (int64, ascending) of ``k`` channels: ``forced`` ones first, then the top scores.

    Ties are broken by the lower channel index, so the choice is deterministic.
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64)
    chosen = [c for c in dict.fromkeys(forced or []) if 0 <= c < n][:k]
    s = scores.float().clone()
    s[torch.tensor(chosen, dtype=torch.int64)] = float("-inf")
    order = torch.argsort(-s, stable=True)  # descending score, lower index first on ties
    rest = [int(c) for c in order[: k - len(chosen)]]
    return torch.tensor(sorted(chosen + rest), dtype=torch.int64)


def split_columns(in_features: int, outlier_idx: torch.Tensor) -> torch.Tensor:
    """The quantized (kept) input channels: all channels not in ``outlier_idx``, ascending."""
    mask = torch.ones(in_features, dtype=torch.bool)
    mask[outlier_idx.long()] = False
    return mask.nonzero().flatten()
