"""Decode attention over a sink-aware cache: which path runs it, and the dispatch.

:func:`decode_attention_ref` (:mod:`quantsink.kv.attention_ref`) is the specification; the
Triton kernel and the C++ CPU kernel in ``quantsink.kernels`` must match it.
:func:`decode_path` names the path a call takes and :func:`decode_with` runs it;
:func:`decode_attention` does both.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from quantsink.errors import check
from quantsink.kv.attention_ref import decode_attention_ref, softmax_with_sinks  # noqa: F401  (public here)
from quantsink.kv.primitives import PackedBlock

BACKENDS = ("auto", "torch", "cpu", "triton")


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
