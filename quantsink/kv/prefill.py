"""Attention of a chunk of ``L > 1`` queries over a :class:`SinkQuantLayer` (plain torch).

This is what makes chunked prefill and teacher-forced evaluation faithful: query ``t`` sees

- every sink (fp16) at a position ``<= t``;
- a body token quantized if it was flushed at a time ``<= t``, else its fp16 value;
- no body group evicted at a time ``<= t``;
- window tokens (fp16) at positions ``<= t``,

which is exactly the cache that token-by-token decoding would have at time ``t``.

Implementation: the keys are extended with the fp16 copies of the tokens flushed during
this chunk, ``[sinks, body (dequantized), window, flushed fp16]``, and a boolean mask lets
query ``t`` see the quantized column of a flushed token iff ``t >= flush_time`` and its fp16
column otherwise. That is one fused SDPA call; only StreamingLLM's sink queries (a
different query for the sink columns) need the explicit softmax.
"""
from __future__ import annotations

import torch

from quantsink.kv.attention_ref import softmax_with_sinks
from quantsink.kv.layer import NEVER, SinkQuantLayer
from quantsink.kv.primitives import dequantize


def chunk_attention_ref(layer: SinkQuantLayer, q: torch.Tensor, scale: float,
                        pad: torch.Tensor | None = None,
                        q_sink: torch.Tensor | None = None, *,
                        sink_logits: torch.Tensor | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """Attention ``[B, Hq, L, D]`` of the chunk queries ``q`` recorded by ``layer.update``.

    ``pad``: optional bool ``[B, >= seen]`` (True = real token) indexed by absolute position.
    ``q_sink``: optional queries used for the sink region only (StreamingLLM).
    ``sink_logits`` / ``softcap``: as in :func:`~quantsink.kv.attention.decode_attention_ref`;
    a sliding layer's window (``layer.sliding_window``) is applied by position.
    """
    keys, values, pos, allowed = _extended(layer, q.dtype)  # k: [B, Hkv, S', D]; allowed [L, S']
    mask = allowed[None, None].to(q.device)
    if pad is not None:
        mask = mask & pad[:, pos].to(q.device)[:, None, None, :]
    B, Hq, L, D = q.shape
    Hkv, S0 = keys.shape[1], layer.sink_k.shape[2]
    plain = (q_sink is None or S0 == 0) and sink_logits is None and softcap is None
    if plain:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
        return out.nan_to_num(0.0)  # a fully padded query row attends to nothing
    g = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # compute dtype
    qf = q.to(acc).reshape(B, Hkv, g * L, D)
    s = torch.matmul(qf, keys.to(acc).transpose(-1, -2)) * scale  # [B, Hkv, g*L, S']
    if q_sink is not None and S0 > 0:
        qs = q_sink.to(acc).reshape(B, Hkv, g * L, D)
        s[..., :S0] = torch.matmul(qs, keys[:, :, :S0].to(acc).transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.reshape(B, Hkv, g, L, -1).masked_fill(~mask[:, :, None], float("-inf"))
    p = softmax_with_sinks(s, sink_logits, Hkv, g).reshape(B, Hkv, g * L, -1)
    return torch.matmul(p, values.to(acc)).reshape(B, Hq, L, D).to(q.dtype)


def _extended(layer: SinkQuantLayer, dtype: torch.dtype):
    """Extended keys/values, their positions and the ``[L, S']`` visibility of each query."""
    step, G = layer.step, layer.cfg.key_group_size
    ks, vs = [layer.sink_k.to(dtype)], [layer.sink_v.to(dtype)]
    if layer.body_k is not None and layer.body_k.num_tokens > 0:
        ks.append(dequantize(layer.body_k, dtype))
        vs.append(dequantize(layer.body_v, dtype))
    ks.append(layer.win_k.to(dtype))
    vs.append(layer.win_v.to(dtype))
    pos = layer.positions()
    S, S0, n_fl = pos.numel(), layer.sink_k.shape[2], step.flush_time.numel()
    first_seen = torch.full((S,), -1, dtype=torch.long)  # quantized columns: visible from flush
    gone = torch.full((S,), NEVER, dtype=torch.long)  # evicted body groups: hidden from eviction
    n_body = layer.body_k.num_tokens if layer.body_k is not None else 0
    gone[S0:S0 + step.evict_time.numel() * G] = step.evict_time.repeat_interleave(G)
    if n_fl:
        ks.append(step.flushed_k.to(dtype))
        vs.append(step.flushed_v.to(dtype))
        first_seen[S0 + n_body - n_fl:S0 + n_body] = step.flush_time
        pos = torch.cat([pos, pos[S0 + n_body - n_fl:S0 + n_body]])
        first_seen = torch.cat([first_seen, torch.full((n_fl,), -1, dtype=torch.long)])
        fp_gone = step.flush_time.minimum(gone[S0 + n_body - n_fl:S0 + n_body])  # fp16 copy until flush
        gone = torch.cat([gone, fp_gone])
    t = step.q_pos[:, None]
    allowed = (pos[None] <= t) & (t >= first_seen[None]) & (t < gone[None])
    if layer.sliding_window is not None:
        allowed &= pos[None] > t - layer.sliding_window
    return torch.cat(ks, 2), torch.cat(vs, 2), pos, allowed
