"""The CPU decode-attention kernel (C++, OpenMP) over the sink-aware cache.

``cpu_decode_attention.cpp`` is compiled once with ``torch.utils.cpp_extension`` (needs a C++
compiler and ninja; about 30 s) into ``$QUANTSINK_CACHE/torch_extensions``, for the CPU's
vector extension (AVX-512, AVX2 or plain). It reads the packed body once per decode step
and never materialises it in float: per key group the scales fold into the query, per value
token into the probability. Same signature and result as
:func:`quantsink.kv.attention.decode_attention_ref` for one query per row (fp32 arithmetic).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from quantsink.errors import QuantsinkError
from quantsink.kv.primitives import PackedBlock

SOURCE = Path(__file__).with_name("cpu_decode_attention.cpp")
_ISA = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}
_STATE: dict = {}
log = logging.getLogger("quantsink")


def _build():
    from torch.utils.cpp_extension import load

    from quantsink.models import cache_root

    isa = torch.backends.cpu.get_cpu_capability()
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    name = f"quantsink_cpu_decode_{isa.lower()}_{digest}"
    build = cache_root() / "torch_extensions" / name
    build.mkdir(parents=True, exist_ok=True)
    if not (build / f"{name}.so").exists():
        log.warning("quantsink: compiling the CPU decode-attention kernel once (~30 s) into %s", build)
    return load(name=name, sources=[str(SOURCE)], build_directory=str(build), verbose=False,
                extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", *_ISA.get(isa, [])], extra_ldflags=["-fopenmp"])


def extension():
    """The compiled extension, or raise :class:`QuantsinkError` saying why it is not available."""
    if "ext" not in _STATE:
        if os.environ.get("QUANTSINK_NO_CPU_KERNEL") == "1":
            _STATE["ext"], _STATE["why"] = None, "QUANTSINK_NO_CPU_KERNEL=1"
        else:
            try:
                _STATE["ext"], _STATE["why"] = _build(), None
            except (RuntimeError, OSError, ImportError) as exc:  # no compiler, no ninja, build error
                _STATE["ext"], _STATE["why"] = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if _STATE["ext"] is None:
        raise QuantsinkError(f"the CPU decode kernel is not available ({_STATE['why']}); allowed: backend='torch'")
    return _STATE["ext"]


def available() -> bool:
    """True when the kernel is compiled (or compiles now)."""
    try:
        extension()
    except QuantsinkError:
        return False
    return True


def _f32(x: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0) if x is None else x.detach().to(torch.float32).contiguous()


def _body_args(body_k: PackedBlock | None, body_v: PackedBlock | None) -> list:
    if body_k is None or body_k.num_tokens == 0:
        empty8, empty = torch.empty(0, dtype=torch.uint8), torch.empty(0)
        return [empty8, empty, empty, empty8, empty, empty8, empty, empty, 0, 64, 4, 4, 64]
    oi = torch.empty(0, dtype=torch.uint8) if body_k.outlier_idx is None else body_k.outlier_idx.contiguous()
    return [body_k.codes.contiguous(), _f32(body_k.scale), _f32(body_k.zero), oi, _f32(body_k.outlier_delta),
            body_v.codes.contiguous(), _f32(body_v.scale), _f32(body_v.zero_or_implied()), body_k.offset,
            body_k.group_size, body_k.bits, body_v.bits, body_v.group_size]


def sink_decode_cpu(q: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor, body_k: PackedBlock | None,
                    body_v: PackedBlock | None, win_k: torch.Tensor, win_v: torch.Tensor, scale: float,
                    key_mask: torch.Tensor | None = None, q_sink: torch.Tensor | None = None, *,
                    sink_logits: torch.Tensor | None = None, sliding_window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """C++ version of ``decode_attention_ref`` for ``q: [B, Hq, 1, D]`` on the CPU."""
    B, Hq, Lq, D = q.shape
    if Lq != 1 or q.device.type != "cpu":
        raise QuantsinkError(f"the CPU decode kernel takes one query per row on the CPU, got Lq={Lq} on "
                             f"{q.device}; allowed: backend='torch'")
    ext = extension()
    qf = (q.to(torch.float32) * scale).reshape(B, Hq, D).contiguous()
    qs = qf if q_sink is None else (q_sink.to(torch.float32) * scale).reshape(B, Hq, D).contiguous()
    mask = torch.empty(0, dtype=torch.bool) if key_mask is None else key_mask.to(torch.bool).contiguous()
    body = _body_args(body_k, body_v)  # 8 tensors, then offset, group sizes and bits
    out = ext.sink_decode_cpu(qf, qs, _f32(sink_k), _f32(sink_v), *body[:8], _f32(win_k), _f32(win_v),
                              mask, _f32(sink_logits), *body[8:], sliding_window or 0, float(softcap or 0.0))
    return out.reshape(B, Hq, 1, D).to(q.dtype)
