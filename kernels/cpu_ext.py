"""The C++ CPU extension: decode attention over the sink cache, the W4A32 linear, the int4pack call.

``cpu_decode_attention.cpp`` (with ``cpu_simd.h``), ``cpu_w4_linear.cpp`` and
``cpu_int4_linear.cpp`` are compiled together, once, with
``torch.utils.cpp_extension`` (needs a C++ compiler and ninja; about 40-70 s) into
``$QUANTSINK_CACHE/torch_extensions``, for the CPU's vector extension (AVX-512, AVX2 or
plain); the build name carries a digest of the sources and flags, so an edit rebuilds.
``QUANTSINK_NO_CPU_KERNEL=1`` turns the extension off (callers then use their torch code).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from quantsink.errors import QuantsinkError

SOURCES = tuple(Path(__file__).with_name(n) for n in ("cpu_decode_attention.cpp", "cpu_w4_linear.cpp",
                                                    "cpu_int4_linear.cpp"))
HEADERS = (Path(__file__).with_name("cpu_simd.h"),)  # part of the build digest
_ISA = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
        "AVX2": ["-mavx2", "-mfma", "-mf16c"]}
_STATE: dict = {}
log = logging.getLogger("quantsink")


def _build():
    from torch.utils.cpp_extension import load

    from quantsink.models import cache_root

    isa = torch.backends.cpu.get_cpu_capability()
    cflags = ["-O3", "-fopenmp", "-fno-math-errno", *_ISA.get(isa, [])]
    text = b"".join(p.read_bytes() for p in SOURCES + HEADERS) + repr(cflags).encode()
    digest = hashlib.sha256(text).hexdigest()[:12]
    name = f"quantsink_cpu_{isa.lower()}_{digest}"
    build = cache_root() / "torch_extensions" / name
    build.mkdir(parents=True, exist_ok=True)
    if not (build / f"{name}.so").exists():
        log.warning("quantsink: compiling the CPU kernels once (~40-70 s) into %s", build)
    return load(name=name, sources=[str(p) for p in SOURCES], build_directory=str(build), verbose=False,
                extra_cflags=cflags, extra_ldflags=["-fopenmp"])  # libgomp.so.1: at run time the one torch loaded


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
        raise QuantsinkError(f"the CPU kernels are not available ({_STATE['why']}); allowed: backend='torch'")
    return _STATE["ext"]


def extension_or_none():
    """The compiled extension (compiled now if needed), or None when it is not available."""
    try:
        return extension()
    except QuantsinkError:
        return None


def available() -> bool:
    """True when the extension is compiled (or compiles now)."""
    return extension_or_none() is not None
