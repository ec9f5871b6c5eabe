"""Hooks that gather calibration statistics during ordinary forward passes.

Attention goes through a registered attention function (``quantsink_calib``) that computes
the causal softmax of one layer, reduces it at once to per-key attention mass and hands
back the usual output, so attention statistics cost O(one layer) of memory. It also sees
the post-RoPE keys and the values, whose per-channel ranges it records. Forward hooks on
the decoder layers see the residual stream (massive activations); forward pre-hooks on
every ``nn.Linear`` inside them record input-channel absolute maxima.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from quantsink.calibration.detect import (Thresholds, far_mass, leading_mass, massive_from_magnitude,
                                          positional_limit, token_window_max)
from quantsink.calibration.ranges import RangeStats
from quantsink.errors import check

ATTN_NAME = "quantsink_calib"
_ACTIVE: "Collector | None" = None


def _causal_bias(mask: torch.Tensor | None, q_len: int, k_len: int, ref: torch.Tensor) -> torch.Tensor:
    """Additive float mask [B|1, 1|H, Lq, Lk] from whatever the model's mask function gave."""
    if mask is None:
        pos_q = torch.arange(k_len - q_len, k_len, device=ref.device)
        mask = pos_q[:, None] >= torch.arange(k_len, device=ref.device)[None, :]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=ref.dtype, device=ref.device).masked_fill(~mask, float("-inf"))
    return mask[..., :k_len].to(ref.dtype)


def calib_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None,
                    dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Eager causal attention that reports the probabilities of its layer to the active collector.

    query: [B, H, Lq, D]; key, value: [B, Hkv, Lk, D] (keys after RoPE). Returns ``[B, Lq, H, D]``.
    """
    n_rep = query.shape[1] // key.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    k = key.float().repeat_interleave(n_rep, dim=1)  # [B, H, Lk, D]
    scores = torch.matmul(query.float() * scale, k.transpose(2, 3))  # [B, H, Lq, Lk]
    scores += _causal_bias(attention_mask, query.shape[2], key.shape[2], scores)
    probs = scores.softmax(-1)
    del scores, k
    if _ACTIVE is not None:
        _ACTIVE.observe_attention(module.layer_idx, probs, key, value)
    v = value.repeat_interleave(n_rep, dim=1)
    out = torch.matmul(probs.to(value.dtype), v)  # [B, H, Lq, D]
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register ``quantsink_calib`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_NAME, calib_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and ModuleList of the decoder layers (``model.layers`` for Llama)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.endswith("layers") and len(mod) == n:
            return name, mod
    raise TypeError(f"{type(model).__name__}: no ModuleList of {n} decoder layers found")


class Collector:
    """Accumulates per-layer statistics over calibration batches."""

    def __init__(self, num_layers: int, vocab: int, th: Thresholds) -> None:
        self.th, self.vocab, self.num_layers = th, vocab, num_layers
        self.ids: torch.Tensor | None = None  # [B, L] of the batch in flight
        self.uniq: torch.Tensor | None = None  # [U] distinct ids of the batch
        self.compact: torch.Tensor | None = None  # [B, L] index of each id in ``uniq``
        self._last_input: tuple[torch.Tensor, torch.Tensor] | None = None
        self.windows = 0
        self.seq_len = 0
        self.lead_sum: list[torch.Tensor | None] = [None] * num_layers  # [H, P]
        self.lead_hits = torch.zeros(num_layers, th.lead_positions)  # windows passing the rule
        self.lead_tokens = [[set() for _ in range(th.lead_positions)] for _ in range(num_layers)]
        self.ratio_sum = torch.zeros(num_layers, vocab)  # per-window max ratio, summed
        self.mass_sum = torch.zeros(num_layers, vocab)
        self.token_windows = torch.zeros(vocab)
        self.keys = [RangeStats(th.lead_positions) for _ in range(num_layers)]
        self.values = [RangeStats(th.lead_positions) for _ in range(num_layers)]
        self.medians: list[list[float]] = [[] for _ in range(num_layers)]
        self.resid_absmax: list[torch.Tensor | None] = [None] * num_layers  # [C]
        self.massive: dict[tuple[int, int], dict] = {}
        self.act_absmax: dict[str, torch.Tensor] = {}

    def begin_batch(self, ids: torch.Tensor) -> None:
        """Announce the token ids [B, L] of the next forward pass."""
        self.ids = ids.cpu()
        self._last_input = None
        self.seq_len = ids.shape[1]
        self.windows += ids.shape[0]
        self.uniq, self.compact = self.ids.unique(return_inverse=True)
        scored = self._scored_keys(ids.shape[1])
        _, present = token_window_max(self.compact, torch.zeros(ids.shape), scored, len(self.uniq))
        self.token_windows.index_add_(0, self.uniq, present)

    def lead_distinct(self) -> torch.Tensor:
        """[layers, P] distinct token ids among the windows where a leading position passed."""
        return torch.tensor([[len(s) for s in row] for row in self.lead_tokens], dtype=torch.float32)

    def _scored_keys(self, seq: int) -> torch.Tensor:
        pos = torch.arange(seq)
        far_queries = (seq - pos - self.th.local_window).clamp(min=0)
        return (pos >= self.th.content_skip) & (far_queries >= self.th.min_queries)

    @torch.no_grad()
    def observe_attention(self, layer: int, probs: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor) -> None:
        """probs: [B, H, L, L]; key, value: [B, Hkv, L, D]."""
        check(probs.shape[-1] == probs.shape[-2], "calibration runs windows without a KV cache")
        lead = leading_mass(probs, self.th.lead_positions).cpu()  # [B, H, P]
        p = lead.shape[-1]
        limit = positional_limit(probs.shape[-1], p, self.th)
        passed = lead.mean(1) >= limit  # [B, P]
        self.lead_hits[layer, :p] += passed.sum(0)
        for b, pos in passed.nonzero().tolist():
            self.lead_tokens[layer][pos].add(int(self.ids[b, pos]))
        lead = lead.sum(0)
        self.lead_sum[layer] = lead if self.lead_sum[layer] is None else self.lead_sum[layer] + lead
        mass, ratio, _ = far_mass(probs.mean(1), self.th.local_window)  # [B, L] each
        scored = self._scored_keys(probs.shape[-1])
        ratio_max, _ = token_window_max(self.compact, ratio.cpu(), scored, len(self.uniq))
        mass_max, _ = token_window_max(self.compact, mass.cpu(), scored, len(self.uniq))
        self.ratio_sum[layer].index_add_(0, self.uniq, ratio_max)
        self.mass_sum[layer].index_add_(0, self.uniq, mass_max)
        sinkish = (ratio.cpu() >= self.th.content_ratio) & scored  # [B, L] sink occurrences
        self.keys[layer].update(key.detach().float().cpu(), sinkish)
        self.values[layer].update(value.detach().float().cpu(), sinkish)

    @torch.no_grad()
    def observe_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """hidden: [B, L, C], the residual stream after decoder layer ``layer``."""
        hidden = hidden.detach().float().cpu()
        mag = hidden.abs()
        absmax = mag.amax(dim=(0, 1))
        prev = self.resid_absmax[layer]
        self.resid_absmax[layer] = absmax if prev is None else torch.maximum(prev, absmax)
        median, rows = massive_from_magnitude(hidden, mag, self.th.massive_ratio)
        self.medians[layer].append(median)
        for row in rows:
            self._merge_massive(layer, row)

    def _merge_massive(self, layer: int, row: dict) -> None:
        entry = self.massive.setdefault((layer, row["channel"]), {
            "layer": layer, "channel": row["channel"], "value": 0.0,
            "positions": set(), "token_ids": set(), "occurrences": 0})
        if abs(row["value"]) > abs(entry["value"]):
            entry["value"] = row["value"]
        entry["positions"].update(row["positions"])
        entry["token_ids"].update(int(self.ids[b, p]) for b, p in row["hits"][:1024])
        entry["occurrences"] += len(row["hits"])

    def observe_linear_input(self, name: str, x: torch.Tensor) -> None:
        """x: [..., in_features], the input of the Linear ``name``."""
        if self._last_input is not None and self._last_input[0] is x:  # q/k/v and gate/up share inputs
            absmax = self._last_input[1]
        else:
            flat = x.detach().flatten(0, -2)  # [tokens, in]; amax/amin beat aminmax/abs here
            absmax = torch.maximum(flat.amax(0), -flat.amin(0)).float().cpu()
            self._last_input = (x, absmax)
        prev = self.act_absmax.get(name)
        self.act_absmax[name] = absmax if prev is None else torch.maximum(prev, absmax)


@contextmanager
def attached(model: nn.Module, collector: Collector) -> Iterator[Collector]:
    """Install the attention function and hooks; restore the model afterwards."""
    global _ACTIVE
    register_attention()
    prefix, layers = decoder_layers(model)
    handles = []
    for idx, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(
            lambda _m, _i, out, idx=idx: collector.observe_hidden(idx, out[0] if isinstance(out, tuple) else out)))
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                full = f"{prefix}.{idx}.{name}"
                handles.append(mod.register_forward_pre_hook(
                    lambda _m, args, full=full: collector.observe_linear_input(full, args[0])))
    original = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    _ACTIVE = collector
    try:
        yield collector
    finally:
        _ACTIVE = None
        collector._last_input = None
        model.set_attn_implementation(original)
        for h in handles:
            h.remove()
