"""Pure detection rules on tensors: attention sinks and massive activations.

Attention is causal over windows without history, so query ``i`` sees ``i + 1`` keys and
uniform attention gives each of them ``1 / (i + 1)``. All thresholds are relative to that
uniform share (plus an absolute floor), so they mean the same at 256 or 2,048 tokens.

* Positional sink at position ``p`` in a layer: its share of the attention, averaged over
  heads and over the queries that see it, is ``>= max(pos_min_mass, pos_ratio * uniform(p))``
  on average over the windows, and on its own in at least ``pos_min_windows`` (a fraction)
  of the windows, with at least two different tokens at ``p`` among those windows (so that a
  content sink that happens to sit at ``p`` does not count as positional).
* Content sink: a token id whose strongest occurrence in a window (usually its first)
  draws, from queries at least ``local_window`` tokens later, on average over the windows
  it occurs in (at least ``content_min_windows``), ``>= content_ratio`` times the uniform
  share and ``>= content_min_mass`` of the attention. Keys before ``content_skip``
  are left to the positional rule; keys with fewer than ``min_queries`` far queries are
  not scored.
* Massive activation (Sun et al. 2024): ``|h| >= massive_ratio * median(|h|)`` over the
  layer's residual-stream output.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Thresholds:
    """Detection thresholds (see the module docstring for the rules)."""

    lead_positions: int = 32
    pos_min_mass: float = 0.05
    pos_ratio: float = 4.0
    pos_min_windows: float = 0.5
    content_ratio: float = 10.0
    content_min_mass: float = 0.05
    content_skip: int = 4
    local_window: int = 8
    min_queries: int = 32
    content_min_windows: int = 3
    massive_ratio: float = 100.0
    max_positions: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


def leading_mass(probs: torch.Tensor, lead: int) -> torch.Tensor:
    """Share of attention on each of the first ``lead`` keys, averaged over the queries that see it.

    probs: [B, H, L, L] causal softmax probabilities; returns [B, H, min(lead, L)].
    """
    seq = probs.shape[-1]
    p = min(lead, seq)
    seen_by = torch.arange(seq, seq - p, -1, device=probs.device, dtype=probs.dtype)  # [P]: L - j
    return probs[..., :p].sum(-2) / seen_by


def far_mass(probs: torch.Tensor, local_window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-key attention from queries at least ``local_window`` positions later.

    probs: [B, L, L] causal (zero above the diagonal), heads already averaged. Returns
    ``(mass, ratio, count)``: mass [B, L] the mean share of attention, ratio [B, L] the same
    relative to uniform attention, and count [L] the number of such queries per key. Costs one
    pass over ``probs``: column sums minus the ``local_window`` diagonals next to the main one.
    """
    seq = probs.shape[-1]
    pos = torch.arange(seq, device=probs.device)
    weights = torch.stack([torch.ones(seq, device=probs.device), (pos + 1).float()]).to(probs.dtype)
    total = torch.matmul(weights, probs)  # [B, 2, Lk]: sum_i p[i, j] and sum_i (i + 1) p[i, j]
    for d in range(min(local_window, seq)):
        near = torch.diagonal(probs, offset=-d, dim1=1, dim2=2)  # [B, L - d]: p[j + d, j]
        total[:, 0, :seq - d] -= near
        total[:, 1, :seq - d] -= near * (pos[:seq - d] + d + 1).to(probs.dtype)
    count = (seq - pos - local_window).clamp(min=0).to(probs.dtype)  # [Lk]
    total = torch.where(count > 0, total.clamp(min=0), torch.zeros_like(total)) / count.clamp(min=1)
    return total[:, 0], total[:, 1], count


def uniform_share(seq_len: int, positions: int) -> torch.Tensor:
    """Uniform attention's share of each of the first ``positions`` keys, averaged over queries.

    Returns [positions]: ``mean_{i >= p} 1 / (i + 1)`` for a causal window of ``seq_len``.
    """
    inv = 1.0 / torch.arange(1, seq_len + 1, dtype=torch.float64)
    tail = inv.flip(0).cumsum(0).flip(0)  # tail[p] = sum_{i >= p} 1 / (i + 1)
    p = torch.arange(min(positions, seq_len))
    return (tail[p] / (seq_len - p)).float()


def positional_limit(seq_len: int, positions: int, th: Thresholds) -> torch.Tensor:
    """[positions] the share a leading position needs to count as a sink."""
    return torch.clamp(th.pos_ratio * uniform_share(seq_len, positions), min=th.pos_min_mass)


def find_positional_sinks(mass: torch.Tensor, seq_len: int, th: Thresholds,
                          window_fraction: torch.Tensor | None = None,
                          distinct_tokens: torch.Tensor | None = None, min_distinct: int = 2) -> list[dict]:
    """Positions that pass the positional rule in at least one layer.

    mass: [layers, P] head-averaged share per leading position, averaged over windows;
    window_fraction: [layers, P] the fraction of windows in which it passed on its own;
    distinct_tokens: [layers, P] how many different token ids sat at the position in those
    windows, at least ``min_distinct`` (either None: not checked). Returns rows
    ``{"position", "layers", "mass"}`` sorted by position.
    """
    hits = mass >= positional_limit(seq_len, mass.shape[1], th)  # [layers, P]
    if window_fraction is not None:
        hits &= window_fraction >= th.pos_min_windows
    if distinct_tokens is not None:
        hits &= distinct_tokens >= min_distinct
    rows = []
    for p in range(mass.shape[1]):
        layers = hits[:, p].nonzero().flatten().tolist()
        if layers:
            rows.append({"position": p, "layers": layers,
                         "mass": [round(float(mass[l, p]), 5) for l in layers]})
    return rows


def leading_prefix(rows: list[dict]) -> list[int]:
    """The contiguous run of sink positions starting at 0 (what a cache keeps in fp16)."""
    found = {r["position"] for r in rows}
    prefix: list[int] = []
    while len(prefix) in found:
        prefix.append(len(prefix))
    return prefix


def token_window_max(ids: torch.Tensor, values: torch.Tensor, scored: torch.Tensor,
                     size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window, the largest value over each token id's scored occurrences, summed over windows.

    ids: [B, L] integer ids in ``[0, size)`` (token ids, or their indices among a batch's
    unique ids); values: [B, L]; scored: [L] bool. Returns ``(sum_of_max [size], windows [size])``
    where ``windows`` counts the windows in which the id had a scored occurrence.
    """
    batch = ids.shape[0]
    idx = (ids[:, scored] + size * torch.arange(batch, device=ids.device)[:, None]).flatten()
    vals = values[:, scored].flatten().float()
    best = torch.zeros(batch * size, device=ids.device).scatter_reduce(0, idx, vals, "amax")
    present = torch.zeros(batch * size, device=ids.device).index_fill(0, idx, 1.0)
    return best.view(batch, size).sum(0), present.view(batch, size).sum(0)


def find_content_sinks(ratio_sum: torch.Tensor, mass_sum: torch.Tensor, windows: torch.Tensor,
                       th: Thresholds, decode: Callable[[int], str]) -> list[dict]:
    """Token ids that pass the content rule in at least one layer.

    ratio_sum, mass_sum: [layers, V] sums over windows of the per-window maximum; windows: [V]
    the number of windows each id was scored in. Returns rows ``{"token_id", "token", "layers",
    "mass", "ratio_to_uniform", "windows"}``, strongest first.
    """
    n_windows = windows.clamp(min=1)
    ratio = ratio_sum / n_windows  # [layers, V]
    hits = (ratio >= th.content_ratio) & (mass_sum / n_windows >= th.content_min_mass)
    hits &= windows >= th.content_min_windows
    rows = []
    for t in hits.any(0).nonzero().flatten().tolist():
        layers = hits[:, t].nonzero().flatten().tolist()
        rows.append({"token_id": t, "token": decode(t), "layers": layers,
                     "mass": [round(float(mass_sum[l, t] / n_windows[t]), 5) for l in layers],
                     "ratio_to_uniform": [round(float(ratio[l, t]), 2) for l in layers],
                     "windows": int(windows[t])})
    rows.sort(key=lambda r: -max(r["ratio_to_uniform"]))
    return rows


def find_massive(hidden: torch.Tensor, ratio: float) -> tuple[float, list[dict]]:
    """Massive activations in one layer's residual-stream output.

    hidden: [B, L, C]. Returns ``(median |h|, rows)``; one row per channel with any entry
    ``>= ratio * median``: ``{"channel", "value" (signed, largest |h|), "ratio_to_median",
    "positions" (sorted), "hits" (list of (b, pos))}``.
    """
    return massive_from_magnitude(hidden.detach().float(), hidden.detach().abs().float(), ratio)


def massive_from_magnitude(hidden: torch.Tensor, mag: torch.Tensor, ratio: float) -> tuple[float, list[dict]]:
    """:func:`find_massive` with ``mag = |hidden|`` already computed (both [B, L, C])."""
    median = float(mag.median())
    hit = mag >= ratio * max(median, torch.finfo(torch.float32).tiny)
    rows = []
    for ch in hit.any(dim=(0, 1)).nonzero().flatten().tolist():
        where = hit[..., ch].nonzero()  # [n, 2]: (b, pos)
        col = hidden[..., ch]
        value = float(col.flatten()[mag[..., ch].flatten().argmax()])
        rows.append({"channel": ch, "value": value,
                     "ratio_to_median": abs(value) / max(median, 1e-30),
                     "positions": sorted(set(where[:, 1].tolist())),
                     "hits": [tuple(x) for x in where.tolist()]})
    return median, rows
