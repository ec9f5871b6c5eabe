"""Hooks that gather calibration statistics during ordinary forward passes.

Attention goes through a registered attention function (``quantsink_calib``, switched in
with the adapter's checked :func:`~quantsink.hf.attention.custom_attention`) that computes
exactly the attention the model computes: its scaling, Gemma 2's logit softcapping (where
the model's own implementation applies it: transformers' sdpa drops it), the layer's mask
(sliding window included, and the window of the call re-applied) and GPT-OSS's learned sink
logits (an extra softmax column per head, dropped after normalising, as the
model does). It reduces the probabilities at once to per-key attention mass and the
learned sink's share, and hands back the usual output, so attention statistics cost
O(one layer) of memory. It also sees the post-RoPE keys, whose per-channel magnitudes it
records for the key-channel figure. Forward hooks on the decoder layers see the residual
stream (massive activations); forward pre-hooks on every ``nn.Linear`` inside them record
input-channel absolute maxima.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from quantsink.calibration.detect import (Thresholds, far_mass, leading_mass, massive_from_magnitude,
                                          positional_limit, token_window_max)
from quantsink.calibration.ranges import KeyMagnitudes
from quantsink.errors import check
from quantsink.hf.arch import attention_specs, decoder_layers
from quantsink.hf.attention import Extras, custom_attention, extras_from_call
from quantsink.hf.support import applies_softcap

ATTN_NAME = "quantsink_calib"
_ACTIVE: "Collector | None" = None


def _bias(mask: torch.Tensor | None, q_len: int, k_len: int, window: int | None,
          ref: torch.Tensor) -> torch.Tensor:
    """Additive float mask [B|1, 1|H, Lq, Lk]: the model's mask (bool or additive), causal when
    absent, with the call's sliding window (query q sees keys q - window < k <= q) on top."""
    pos_q = torch.arange(k_len - q_len, k_len, device=ref.device)[:, None]  # [Lq, 1]
    pos_k = torch.arange(k_len, device=ref.device)[None, :]  # [1, Lk]
    if mask is None:
        mask = pos_q >= pos_k
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=ref.dtype, device=ref.device).masked_fill(~mask, float("-inf"))
    else:
        bias = mask[..., :k_len].to(ref.dtype)
    if window is not None:
        bias = bias.masked_fill(pos_k <= pos_q - window, float("-inf"))
    return bias


def calib_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The layer's attention, in float32, reporting its probabilities to the active collector.

    query: [B, H, Lq, D]; key, value: [B, Hkv, Lk, D] (keys after RoPE). Returns ``[B, Lq, H, D]``.
    """
    return _attention(module, query, key, value, attention_mask, extras_from_call(module, query, kwargs))


def calib_attention_without_softcap(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """:func:`calib_attention` for models whose own implementation drops the softcap (sdpa)."""
    ex = dataclasses.replace(extras_from_call(module, query, kwargs), softcap=None)
    return _attention(module, query, key, value, attention_mask, ex)


def attention_for(model: nn.Module) -> Callable:
    """The calibration attention that computes what ``model``'s own implementation computes."""
    return calib_attention if applies_softcap(model) or not _has_softcap(model) else \
        calib_attention_without_softcap


def _has_softcap(model: nn.Module) -> bool:
    return any(s.softcap is not None for s in attention_specs(model))


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, ex: Extras) -> tuple[torch.Tensor, None]:
    n_rep = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(n_rep, dim=1)  # [B, H, Lk, D]
    scores = torch.matmul(query.float(), k.transpose(2, 3)) * ex.scaling  # [B, H, Lq, Lk]
    del k
    if ex.softcap is not None:  # in place: one [B, H, Lq, Lk] buffer
        scores.div_(ex.softcap).tanh_().mul_(ex.softcap)
    scores += _bias(attention_mask, query.shape[2], key.shape[2], ex.sliding_window, scores)
    sink = None
    if ex.sink_logits is not None:  # one more column per head, dropped after normalising
        col = ex.sink_logits.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.cat([scores, col], dim=-1).softmax(-1)
        probs, sink = probs[..., :-1], probs[..., -1]  # [B, H, Lq, Lk], [B, H, Lq]
    else:
        probs = scores.softmax(-1)
    del scores
    if _ACTIVE is not None:
        _ACTIVE.observe_attention(module.layer_idx, probs, key, sink)
    v = value.float().repeat_interleave(n_rep, dim=1)
    out = torch.matmul(probs, v).to(value.dtype)  # [B, H, Lq, D]
    return out.transpose(1, 2).contiguous(), None


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
        self.keys = [KeyMagnitudes(th.lead_positions) for _ in range(num_layers)]
        self.sink_sum: list[torch.Tensor | None] = [None] * num_layers  # [H] learned sink share
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
                          sink: torch.Tensor | None = None) -> None:
        """probs: [B, H, L, L] over the real keys; key: [B, Hkv, L, D]; sink: [B, H, L] the
        learned sink's share of each query's attention (None without learned sinks)."""
        check(probs.shape[-1] == probs.shape[-2], "calibration runs windows without a KV cache")
        if sink is not None:
            share = sink.float().mean(-1).sum(0).cpu()  # [H], summed over windows
            prev = self.sink_sum[layer]
            self.sink_sum[layer] = share if prev is None else prev + share
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
    _ACTIVE = collector
    try:
        with custom_attention(model, ATTN_NAME, attention_for(model)):
            yield collector
    finally:
        _ACTIVE = None
        collector._last_input = None
        for h in handles:
            h.remove()
