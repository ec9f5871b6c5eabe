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

BACKENDS = ("auto", "torch", "cpu", "triton")


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


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick ``torch`` (the reference), ``cpu`` (the C++ kernel) or ``triton``.

    ``auto`` follows ``QUANTSINK_BACKEND`` when set, else triton on CUDA (if triton is
    installed), the C++ kernel on the CPU (if it compiles; see
    :mod:`quantsink.kernels.cpu_decode`) and the reference elsewhere. ``triton`` on CPU tensors
    needs ``TRITON_INTERPRET=1`` set before triton is imported (the kernel then runs in the
    Triton interpreter).
    """
    check(backend in BACKENDS, f"attention backend {backend!r} is not supported; allowed: {list(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get("QUANTSINK_BACKEND", "auto")
        check(backend in BACKENDS,
              f"QUANTSINK_BACKEND={backend!r} is not supported; allowed: {list(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    if device.type == "cpu":
        from quantsink.kernels.cpu_decode import available

        return "cpu" if available() else "torch"
    return "torch"


def decode_path(q: torch.Tensor, body_k: PackedBlock | None, body_v: PackedBlock | None,
                backend: str = "auto") -> str:
    """The path a decode call takes: ``triton``, ``cpu``, ``torch``, or ``torch (<reason>)`` when
    the chosen kernel does not cover these inputs and the reference (the same result) runs."""
    chosen = resolve_backend(backend, q.device)
    if chosen == "triton":
        from quantsink.kernels._decode_launch import unsupported

        why = unsupported(body_k if body_k is not None and body_k.num_tokens else None, body_v, q.shape[-1])
        return "triton" if why is None else f"torch (triton: {why})"
    if chosen == "cpu":
        if q.dtype == torch.float64:
            return "torch (cpu kernel: float64 queries)"
        return "cpu" if q.shape[2] == 1 else "torch (cpu kernel: more than one query)"
    return "torch"


def decode_attention(*args, backend: str = "auto", **kwargs) -> torch.Tensor:
    """Dispatch to the Triton kernel, the C++ CPU kernel or :func:`decode_attention_ref`
    (same signature and result); :func:`decode_path` tells which."""
    q = args[0] if args else kwargs["q"]
    body_k = args[3] if len(args) > 3 else kwargs.get("body_k")
    body_v = args[4] if len(args) > 4 else kwargs.get("body_v")
    return decode_with(decode_path(q, body_k, body_v, backend), *args, **kwargs)


def decode_with(path: str, *args, **kwargs) -> torch.Tensor:
    """Run decode attention on ``path`` (a :func:`decode_path` answer)."""
    if path == "triton":
        from quantsink.kernels.decode_attention import sink_decode_attention

        return sink_decode_attention(*args, **kwargs)
    if path == "cpu":
        from quantsink.kernels.cpu_decode import sink_decode_cpu

        return sink_decode_cpu(*args, **kwargs)
    return decode_attention_ref(*args, **kwargs)
