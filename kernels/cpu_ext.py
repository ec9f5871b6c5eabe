"""The C++ CPU extension: decode attention, the W4A32 linear, the int8-rows product, int4pack.

Three ISA levels of the same kernels (``cpu_isa_<level>.cpp``: one vector header per level,
the kernel bodies ``cpu_kern_*.h`` written once): ``avx512`` (AVX-512F/BW/VL + AVX2 + FMA +
F16C), ``avx2`` (AVX2 + FMA + F16C) and ``portable`` (plain C++, any CPU). Each level is one
object file compiled by the C++ compiler (``$CXX``, else ``c++``) with its own flags and no
torch headers (seconds each); a level that does not compile is left out, with one log line
naming the compiler's first error. The torch glue (``cpu_dispatch.cpp`` and the entry points)
is compiled by ``torch.utils.cpp_extension`` with baseline flags and linked with the objects.
Everything lands in ``$QUANTSINK_CACHE/torch_extensions/quantsink_cpu_<digest>``, the digest
covering the sources, the flags and the compiler, so an edit rebuilds.

At run time the best level this CPU runs is selected (the C++ side checks the features before
any call); ``QUANTSINK_CPU_ISA=avx512|avx2|portable`` forces one. Every entry point also takes
the level as an optional last argument. :func:`report` says what was found and chosen.
``QUANTSINK_NO_CPU_KERNEL=1`` turns the extension off (callers then use their torch code);
``QUANTSINK_CPU_HIDE_FEATURES=avx512bw,...`` makes CPU features read as absent (for tests).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from quantsink.errors import QuantsinkError

HERE = Path(__file__).parent
LEVELS = ("avx512", "avx2", "portable")  # best first
LANES = {"avx512": 16, "avx2": 8, "portable": 8}  # floats per vector: W of cpu_vec_<level>.h
ISA_FLAGS = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
             "avx2": ["-mavx2", "-mfma", "-mf16c"], "portable": []}
OBJECT_FLAGS = ["-O3", "-fPIC", "-std=c++17", "-fno-math-errno", "-fvisibility=hidden"]
GLUE = tuple(HERE / n for n in ("cpu_dispatch.cpp", "cpu_decode_attention.cpp", "cpu_w4_linear.cpp",
                                "cpu_int8_rows.cpp", "cpu_int4_linear.cpp"))
GLUE_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
# libgomp.so.1: at run time the one torch loaded
LD_FLAGS = ["-fopenmp"]
_STATE: dict[str, Any] = {}
log = logging.getLogger("quantsink")


def compiler() -> list[str]:
    """The C++ compiler command: ``$CXX`` (may carry flags), else ``c++``."""
    return shlex.split(os.environ.get("CXX") or "c++")


def _compiler_id() -> str:
    try:
        out = subprocess.run([*compiler(), "--version"], capture_output=True, text=True, timeout=60)
        return (out.stdout.splitlines() or ["?"])[0]
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _build_dir() -> Path:
    from quantsink.models import cache_root

    text = b"".join(p.read_bytes() for p in sorted(HERE.glob("cpu_*.cpp")) + sorted(HERE.glob("cpu_*.h")))
    text += repr((OBJECT_FLAGS, ISA_FLAGS, GLUE_FLAGS, LD_FLAGS, compiler(), _compiler_id())).encode()
    return cache_root() / "torch_extensions" / f"quantsink_cpu_{hashlib.sha256(text).hexdigest()[:12]}"


def first_error(text: str) -> str:
    """The compiler's first error line (else its first line) of ``text``."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    compiler = [ln for ln in lines if "error:" in ln.lower()]  # gcc / clang: "file:line: error: ..."
    errors = [ln for ln in lines if "error" in ln.lower()]
    return ((compiler or errors or lines or ["no output"])[0])[:300]


def compile_level(level: str, build: Path) -> tuple[Path | None, str | None]:
    """``cpu_isa_<level>.cpp`` to ``build/isa_<level>.o`` (cached): (object, None) or (None, why)."""
    obj, err = build / f"isa_{level}.o", build / f"isa_{level}.err"
    if obj.exists():
        return obj, None
    if err.exists():
        return None, err.read_text()
    tmp = build / f"isa_{level}.{os.getpid()}.tmp.o"
    cmd = [*compiler(), *OBJECT_FLAGS, *ISA_FLAGS[level], "-c", str(HERE / f"cpu_isa_{level}.cpp"), "-o", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        why = None if proc.returncode == 0 else first_error(proc.stderr + proc.stdout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        why = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OSError):  # no compiler: nothing to cache, a later install may fix it
            return None, why
    if why is None:
        os.replace(tmp, obj)
        return obj, None
    err.write_text(why)
    return None, why


def _build():
    """Compile the level objects and the glue; returns (module, {level: None or why not compiled})."""
    from torch.utils.cpp_extension import load

    build = _build_dir()
    build.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(len(LEVELS)) as pool:
        done = dict(zip(LEVELS, pool.map(lambda lv: compile_level(lv, build), LEVELS)))
    status = {lv: why for lv, (_, why) in done.items()}
    if status["portable"] is not None:  # no extension: one line (logged by _load)
        raise RuntimeError(f"the portable kernels do not compile: {status['portable']}")
    for lv, why in status.items():
        if why is not None:
            log.warning("quantsink: the %s CPU kernels are unavailable (compile failed: %s)", lv, why)
    objects = [str(obj) for obj, _ in done.values() if obj is not None]
    defines = [f"-DQS_HAVE_{lv.upper()}=1" for lv in ("avx512", "avx2") if status[lv] is None]
    name = f"{build.name}_{'_'.join(lv for lv in LEVELS if status[lv] is None)}"
    if not (build / f"{name}.so").exists():
        log.warning("quantsink: compiling the CPU kernels once (~1 min) into %s", build)
    module = load(name=name, sources=[str(p) for p in GLUE], build_directory=str(build), verbose=False,
                  extra_cflags=GLUE_FLAGS + defines, extra_ldflags=LD_FLAGS + objects)
    return module, status


def _load() -> None:
    if "ext" in _STATE:
        return
    _STATE.update(ext=None, why=None, compiled={})
    if os.environ.get("QUANTSINK_NO_CPU_KERNEL") == "1":
        _STATE["why"] = "QUANTSINK_NO_CPU_KERNEL=1"
        return
    try:
        _STATE["ext"], _STATE["compiled"] = _build()
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:  # no ninja, build error
        _STATE["why"] = f"{type(exc).__name__}: {first_error(str(exc))}"
        log.warning("quantsink: the C++ CPU kernels are not available (%s)", _STATE["why"])
        return
    hide = [f for f in os.environ.get("QUANTSINK_CPU_HIDE_FEATURES", "").split(",") if f]
    if hide:
        _STATE["ext"].hide_cpu_features(hide)


def level_problem(level: str) -> str | None:
    """Why ``level`` cannot run here (not compiled, or the missing CPU feature), or None."""
    if level not in LEVELS:
        return f"unknown level {level!r}; allowed: {', '.join(LEVELS)}"
    _load()
    if _STATE["ext"] is None:
        return f"the C++ CPU extension is not available ({_STATE['why']})"
    if _STATE["compiled"].get(level):
        return f"the {level} kernels did not compile ({_STATE['compiled'][level]})"
    return _STATE["ext"].isa_problem(level) or None


def runnable_levels() -> list[str]:
    """The levels this host runs, best first (empty without the extension)."""
    return [lv for lv in LEVELS if level_problem(lv) is None]


def _select() -> tuple[str, str]:
    """(level, why): QUANTSINK_CPU_ISA when set (raises if the host cannot run it), else the best."""
    if "selected" not in _STATE:
        forced = os.environ.get("QUANTSINK_CPU_ISA", "")
        if not forced:
            _STATE["selected"] = (runnable_levels()[0], "best level this CPU runs")
        elif forced not in LEVELS:
            _STATE["selected"] = QuantsinkError(f"QUANTSINK_CPU_ISA={forced!r} is not a CPU kernel level; "
                                                f"allowed: {', '.join(LEVELS)}")
        elif (why := level_problem(forced)) is not None:
            _STATE["selected"] = QuantsinkError(f"QUANTSINK_CPU_ISA={forced} cannot run here: {why}; allowed: "
                                                f"{', '.join(runnable_levels())}")
        else:
            _STATE["selected"] = (forced, "forced by QUANTSINK_CPU_ISA")
            _STATE["ext"].set_isa(forced)
    if isinstance(_STATE["selected"], QuantsinkError):
        raise _STATE["selected"]
    return _STATE["selected"]


def extension():
    """The compiled extension with its level selected, or raise :class:`QuantsinkError` saying
    why it is not available (or why ``QUANTSINK_CPU_ISA`` is wrong)."""
    _load()
    if _STATE["ext"] is None:
        raise QuantsinkError(f"the CPU kernels are not available ({_STATE['why']}); allowed: backend='torch'")
    _select()
    return _STATE["ext"]


def extension_or_none():
    """The compiled extension (compiled now if needed), or None when it is not available.

    A wrong ``QUANTSINK_CPU_ISA`` still raises: a forced level is never silently dropped."""
    _load()
    return None if _STATE["ext"] is None else extension()


def unavailable_reason() -> str | None:
    """Why the extension is not available (``QUANTSINK_NO_CPU_KERNEL=1``, no compiler, the
    compiler's first error), or None when it is built (builds it now if needed)."""
    _load()
    return _STATE["why"]


def selected_level() -> str:
    """The ISA level the entry points run by default (raises :class:`QuantsinkError` when the
    extension is not available or ``QUANTSINK_CPU_ISA`` names a level this host cannot run)."""
    extension()
    return _select()[0]


def available() -> bool:
    """True when the extension is compiled (or compiles now)."""
    return extension_or_none() is not None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_flags() -> dict[str, bool]:
    """CPU features from /proc/cpuinfo (when the extension, which asks the CPU, is missing)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = set(text.split())
    names = ("asimd",) if platform.machine() in ("aarch64", "arm64") else \
        ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl")
    return {n: n in flags for n in names}


def report() -> dict[str, Any]:
    """CPU model, features, levels compiled (or why not), the selected level and why, build state."""
    _load()
    ext = _STATE["ext"]
    out: dict[str, Any] = {
        "cpu": _cpu_model(), "machine": platform.machine(), "compiler": " ".join(compiler()),
        "features": dict(ext.cpu_features()) if ext is not None else _proc_flags(),
        "built": ext is not None, "build_error": _STATE["why"],
        "levels": {lv: ("compiled" if ext is not None and not _STATE["compiled"].get(lv) else
                        _STATE["compiled"].get(lv) or "not built") for lv in LEVELS},
        "runnable": runnable_levels() if ext is not None else [], "selected": None, "selected_why": None}
    if ext is not None:
        try:
            out["selected"], out["selected_why"] = _select()
        except QuantsinkError as exc:
            out["selected_why"] = str(exc)
    return out
