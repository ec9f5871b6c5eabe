"""Decode attention over the three regions of a sink-aware cache.

:func:`decode_attention_ref` is the specification: plain torch, any device. The Triton
kernel in ``quantsink.kernels`` must match it. :func:`decode_attention` dispatches.

Regions, in key order: fp16 sinks ``[B, Hkv, S0, D]``, the packed body (keys per channel,
values per token; see :mod:`quantsink.kv.primitives`) and the fp16 recent window
``[B, Hkv, W, D]``. Queries ``q: [B, Hq, Lq, D]`` with ``Hq = g * Hkv`` (GQA: query head
``h`` reads KV head ``h // g``). The ``Lq`` queries are the last ``Lq`` positions of the
concatenated keys, so query ``i`` sees keys ``[0, S - Lq + i]`` (causal).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from quantsink.errors import check
from quantsink.kv.primitives import PackedBlock, dequantize

BACKENDS = ("auto", "torch", "triton")


def decode_attention_ref(q: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor,
                         body_k: PackedBlock | None, body_v: PackedBlock | None,
                         win_k: torch.Tensor, win_v: torch.Tensor, scale: float,
                         key_mask: torch.Tensor | None = None,
                         q_sink: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``q`` over sinks + dequantized body + window; returns ``[B, Hq, Lq, D]``.

    ``key_mask``: optional bool ``[B, S]`` over the concatenated keys (True = attend), for
    padded batches. ``q_sink``: optional query used for the sink region only (StreamingLLM
    rotates it back by the number of evicted tokens); defaults to ``q``.
    """
    B, Hq, Lq, D = q.shape
    Hkv = sink_k.shape[1]
    g = Hq // Hkv
    parts_k, parts_v = [sink_k.float()], [sink_v.float()]
    if body_k is not None and body_k.num_tokens > 0:
        parts_k.append(dequantize(body_k))  # transient fp32 copy of the body, freed on return
        parts_v.append(dequantize(body_v))
    parts_k.append(win_k.float())
    parts_v.append(win_v.float())
    k = torch.cat(parts_k, dim=2)  # k: [B, Hkv, S, D]
    v = torch.cat(parts_v, dim=2)
    S, S0 = k.shape[2], sink_k.shape[2]
    qf = q.float().reshape(B, Hkv, g * Lq, D)  # GQA folded into the query axis
    scores = torch.matmul(qf, k.transpose(-1, -2)) * scale  # [B, Hkv, g*Lq, S]
    if q_sink is not None and S0 > 0:
        qs = q_sink.float().reshape(B, Hkv, g * Lq, D)
        scores[..., :S0] = torch.matmul(qs, sink_k.float().transpose(-1, -2)) * scale
    scores = scores.reshape(B, Hkv, g, Lq, S)
    pos = torch.arange(S, device=q.device)
    causal = pos[None, :] <= (S - Lq + torch.arange(Lq, device=q.device))[:, None]  # [Lq, S]
    allowed = causal[None, None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, None, :].bool()
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows give zeros
    out = torch.matmul(p.reshape(B, Hkv, g * Lq, S), v)  # [B, Hkv, g*Lq, D]
    return out.reshape(B, Hq, Lq, D).to(q.dtype)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick ``torch`` or ``triton``.

    ``auto`` follows ``QUANTSINK_BACKEND`` when set, else triton on CUDA (if triton is
    installed) and torch elsewhere. ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``
    set before triton is imported (the kernel then runs in the Triton interpreter).
    """
    check(backend in BACKENDS, f"attention backend {backend!r} is not supported; allowed: {list(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get("QUANTSINK_BACKEND", "auto")
        check(backend in BACKENDS,
              f"QUANTSINK_BACKEND={backend!r} is not supported; allowed: {list(BACKENDS)}")
    if backend == "auto":
        on_gpu = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        return "triton" if on_gpu else "torch"
    return backend


def decode_attention(*args, backend: str = "auto", **kwargs) -> torch.Tensor:
    """Dispatch to the Triton kernel or to :func:`decode_attention_ref` (same signature)."""
    q = args[0] if args else kwargs["q"]
    if resolve_backend(backend, q.device) == "triton":
        from quantsink.kernels.decode_attention import sink_decode_attention

        return sink_decode_attention(*args, **kwargs)
    return decode_attention_ref(*args, **kwargs)
