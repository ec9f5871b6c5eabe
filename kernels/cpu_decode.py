"""The CPU decode-attention kernel (C++, OpenMP) over the sink-aware cache.

``cpu_decode_attention.cpp`` is part of the C++ extension of :mod:`quantsink.kernels.cpu_ext`
(compiled once; needs a C++ compiler and ninja). It reads the packed body once per decode step
and never materialises it in float: per key group the scales fold into the query, per value
token into the probability. It runs on the ISA level the extension selected (AVX-512, AVX2 or
portable C++). Same signature and result as
:func:`quantsink.kv.attention.decode_attention_ref` for one query per row (fp32 arithmetic).
"""
from __future__ import annotations

import torch

from quantsink.errors import QuantsinkError
from quantsink.kernels.cpu_ext import available, extension  # noqa: F401  (re-exported)
from quantsink.kv.primitives import PackedBlock


_EMPTY8, _EMPTY, _NO_MASK = torch.empty(0, dtype=torch.uint8), torch.empty(0), torch.empty(0, dtype=torch.bool)
_NO_BODY = [_EMPTY8, _EMPTY, _EMPTY, _EMPTY8, _EMPTY, _EMPTY8, _EMPTY, _EMPTY, 0, 64, 4, 4, 64, False]


def _body_args(body_k: PackedBlock | None, body_v: PackedBlock | None) -> list:
    """The body as the extension takes it: 8 tensors, then offset, group sizes, bits, symmetry."""
    if body_k is None or body_k.num_tokens == 0:
        return _NO_BODY
    oi = _EMPTY8 if body_k.outlier_idx is None else body_k.outlier_idx
    od = _EMPTY if body_k.outlier_delta is None else body_k.outlier_delta
    vz = _EMPTY if body_v.zero is None else body_v.zero
    return [body_k.codes, body_k.scale, body_k.zero, oi, od, body_v.codes, body_v.scale, vz, body_k.offset,
            body_k.group_size, body_k.bits, body_v.bits, body_v.group_size, body_v.zero is None]


def sink_decode_cpu(q: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor, body_k: PackedBlock | None,
                    body_v: PackedBlock | None, win_k: torch.Tensor, win_v: torch.Tensor, scale: float,
                    key_mask: torch.Tensor | None = None, q_sink: torch.Tensor | None = None, *,
                    sink_logits: torch.Tensor | None = None, sliding_window: int | None = None,
                    softcap: float | None = None, isa: str | None = None) -> torch.Tensor:
    """C++ version of ``decode_attention_ref`` for ``q: [B, Hq, 1, D]`` on the CPU.

    The stored tensors go to the extension as they are (fp16 / bf16 / fp32, read as float);
    key codes may have 2, 3, 4 or 8 bits, key outlier slots may be uint8 or int16. ``isa``:
    the ISA level (``avx512`` / ``avx2`` / ``portable``; default: the selected one, see
    :mod:`quantsink.kernels.cpu_ext`).
    """
    if q.shape[2] != 1 or q.device.type != "cpu":
        raise QuantsinkError(f"the CPU decode kernel takes one query per row on the CPU, got Lq={q.shape[2]} "
                             f"on {q.device}; allowed: backend='torch'")
    mask = _NO_MASK if key_mask is None else key_mask.to(torch.bool)
    body = _body_args(body_k, body_v)
    out = extension().sink_decode_cpu(
        q.detach(), q.detach() if q_sink is None else q_sink.detach(), sink_k, sink_v, *body[:8], win_k, win_v,
        mask, _EMPTY if sink_logits is None else sink_logits.detach(), *body[8:],
        float(scale), sliding_window or 0, float(softcap or 0.0), isa or "")
    return out if q.dtype == torch.float32 else out.to(q.dtype)
