"""What this install runs on this host: versions, CPU features, the C++ extension, kernel per layer.

:func:`environment` collects it (never raises: a missing compiler or a failed build is a
field, the compiler's first error its value); :func:`format_environment` prints it as
``key: value`` lines (``quantsink env``). Nothing here imports triton.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16", "asimd", "sve")
GROUPS = (32, 64, 128)  # the W4A32 group sizes the recipes ship


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_flags() -> dict[str, bool]:
    """The CPU features of :data:`FEATURES` as /proc/cpuinfo lists them (``asimd``: NEON)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return {}
    return {f: f in flags for f in FEATURES}


def _w4_kernel(group: int) -> str:
    from quantsink.weights import cpu_int4, cpu_w4

    why = cpu_w4.layer_problem(4, group)
    if why is None:
        return cpu_w4.kernel_name(group)
    if cpu_int4.layer_problem(4, group) is None:
        return f"int4pack (W4A32 kernel: {why})"
    return f"reference (slow: {why}; int4pack: {cpu_int4.layer_problem(4, group)})"


def kernels_per_layer() -> dict[str, str]:
    """The CPU path each layer type takes on this host (what ``backend='auto'`` picks)."""
    from quantsink.kernels import cpu_ext
    from quantsink.weights import cpu_int4
    from quantsink.weights.rows_ops import rows_kernel

    out = {f"W4A32 linear (group {g})": _w4_kernel(g) for g in GROUPS}
    out["int8 rows (embedding / lm_head)"] = rows_kernel(cpu_int4.kernel_problem() is None)
    why = cpu_ext.unavailable_reason()
    out["decode attention"] = (f"cpu-sink-decode[{cpu_ext.selected_level()}]" if why is None
                               else f"reference (slow: {why})")
    int4 = cpu_int4.kernel_problem()
    out["int4pack (backend='int4pack')"] = "aten int4pack (bf16)" if int4 is None else f"unavailable: {int4}"
    return out


def environment() -> dict[str, Any]:
    """Versions, CPU, extension state, selected ISA level and the kernel per layer type."""
    import torch

    from quantsink import __version__
    from quantsink.errors import QuantsinkError
    from quantsink.kernels import cpu_ext

    env: dict[str, Any] = {
        "quantsink": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": _version("transformers"), "kernels (Hugging Face)": _version("kernels"),
        "triton": _version("triton"), "torch CPU capability": torch.backends.cpu.get_cpu_capability()}
    rep = cpu_ext.report()
    env["cpu"] = f"{rep['cpu']} ({rep['machine']})"
    env["cpu features"] = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu_flags().items())
    env["features the levels check"] = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in rep["features"].items())
    env["extension"] = "built" if rep["built"] else f"not built: {rep['build_error']}"
    env["compiler"] = rep["compiler"]
    env["isa levels"] = ", ".join(f"{lv}: {why}" for lv, why in rep["levels"].items())
    env["isa runnable"] = ", ".join(rep["runnable"]) or "none"
    forced = os.environ.get("QUANTSINK_CPU_ISA")
    env["isa selected"] = f"{rep['selected'] or 'none'} ({rep['selected_why'] or rep['build_error']})"
    env["isa forced by env"] = f"QUANTSINK_CPU_ISA={forced}" if forced else "no"
    try:
        env["kernels"] = kernels_per_layer()
    except QuantsinkError as exc:  # a QUANTSINK_CPU_ISA this host cannot run
        env["kernels"] = {"all": f"error: {exc}"}
    return env


def format_environment(env: dict[str, Any]) -> str:
    """``key: value`` lines; the kernel per layer type indented under ``kernels:``."""
    lines = []
    for key, value in env.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
