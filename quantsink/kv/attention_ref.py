"""The specification of decode attention over the three regions of a sink-aware cache.

:func:`decode_attention_ref` is plain torch, any device; the Triton and C++ kernels in
``quantsink.kernels`` must match it (:mod:`quantsink.kv.attention` dispatches). Regions, in
key order: fp16 sinks ``[B, Hkv, S0, D]``, the packed body (keys per channel, values per
token; see :mod:`quantsink.kv.primitives`) and the fp16 recent window ``[B, Hkv, W, D]``.
Queries ``q: [B, Hq, Lq, D]`` with ``Hq = g * Hkv`` (GQA: query head ``h`` reads KV head
``h // g``). The ``Lq`` queries are the last ``Lq`` positions of the concatenated keys, so
query ``i`` sees keys ``[0, S - Lq + i]`` (causal).
"""
from __future__ import annotations

import torch

from quantsink.kv.primitives import PackedBlock, dequantize


def decode_attention_ref(q: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor,
                         body_k: PackedBlock | None, body_v: PackedBlock | None,
                         win_k: torch.Tensor, win_v: torch.Tensor, scale: float,
                         key_mask: torch.Tensor | None = None,
                         q_sink: torch.Tensor | None = None, *,
                         sink_logits: torch.Tensor | None = None,
                         sliding_window: int | None = None,
                         softcap: float | None = None) -> torch.Tensor:
    """Attention of ``q`` over sinks + dequantized body + window; returns ``[B, Hq, Lq, D]``.

    ``key_mask``: optional bool ``[B, S]`` over the concatenated keys (True = attend), for
    padded batches. ``q_sink``: optional query used for the sink region only (StreamingLLM
    rotates it back by the number of evicted tokens); defaults to ``q``.
    ``sink_logits``: optional ``[Hq]`` learned per-head logits that join the softmax
    denominator (GPT-OSS): ``p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k))``.
    ``sliding_window``: body and window keys are consecutive positions, so query ``i`` (key
    index ``S - Lq + i``) sees body/window key ``j`` iff ``j > S - Lq + i - sliding_window``;
    sink keys stay visible (the cache drops sinks that left the window).
    ``softcap``: scores become ``softcap * tanh(scores / softcap)`` before masking (Gemma 2).
    """
    B, Hq, Lq, D = q.shape
    Hkv, S0 = sink_k.shape[1], sink_k.shape[2]
    g = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # compute dtype
    parts_k, parts_v = [sink_k.to(acc)], [sink_v.to(acc)]
    if body_k is not None and body_k.num_tokens > 0:
        parts_k.append(dequantize(body_k, acc))  # transient copy of the body, freed on return
        parts_v.append(dequantize(body_v, acc))
    parts_k.append(win_k.to(acc))
    parts_v.append(win_v.to(acc))
    k = torch.cat(parts_k, dim=2)  # k: [B, Hkv, S, D]
    v = torch.cat(parts_v, dim=2)
    S = k.shape[2]
    qf = q.to(acc).reshape(B, Hkv, g * Lq, D)  # GQA folded into the query axis
    scores = torch.matmul(qf, k.transpose(-1, -2)) * scale  # [B, Hkv, g*Lq, S]
    if q_sink is not None and S0 > 0:
        qs = q_sink.to(acc).reshape(B, Hkv, g * Lq, D)
        scores[..., :S0] = torch.matmul(qs, sink_k.to(acc).transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = _allowed(S, S0, Lq, q.device, sliding_window)[None, None, None]  # [1, 1, 1, Lq, S]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, None, :].bool()
    scores = scores.reshape(B, Hkv, g, Lq, S).masked_fill(~allowed, float("-inf"))
    p = softmax_with_sinks(scores, sink_logits, Hkv, g)
    out = torch.matmul(p.reshape(B, Hkv, g * Lq, S), v)  # [B, Hkv, g*Lq, D]
    return out.reshape(B, Hq, Lq, D).to(q.dtype)


def _allowed(S: int, S0: int, Lq: int, device: torch.device, sliding_window: int | None) -> torch.Tensor:
    """``[Lq, S]``: causal over key indices, plus the sliding window over the non-sink keys."""
    key = torch.arange(S, device=device)[None, :]
    last = (S - Lq + torch.arange(Lq, device=device))[:, None]  # key index of each query
    allowed = key <= last
    if sliding_window is not None:
        allowed &= (key > last - sliding_window) | (key < S0)
    return allowed


def softmax_with_sinks(scores: torch.Tensor, sink_logits: torch.Tensor | None, Hkv: int,
                       g: int) -> torch.Tensor:
    """Softmax over the last dim of ``scores [B, Hkv, g, L, S]`` (-inf = masked), optionally
    with one learned logit per query head ``[Hkv * g]`` in the denominator; masked rows give 0."""
    if sink_logits is None:
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)
    sink = sink_logits.to(scores.dtype).reshape(1, Hkv, g, 1, 1).expand(*scores.shape[:-1], 1)
    p = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)
    return p[..., :-1]
