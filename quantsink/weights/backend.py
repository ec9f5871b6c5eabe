"""Which kernel a :class:`~quantsink.weights.linear.QuantLinear` runs, chosen once per device.

Backends (``QUANTSINK_WEIGHT_BACKEND`` or :func:`use_backend` force one; default ``auto``):

- ``cpu`` (CPU, 4-bit, even group sizes, the C++ extension on any ISA level: AVX-512, AVX2 or
  portable C++; the plan's name says which, e.g. ``cpu-w4a32[avx2]``): up
  to :data:`~quantsink.weights.cpu_w4.W4_MAX_ROWS` rows per call through the W4A32 kernel of
  :mod:`quantsink.weights.cpu_w4`, which reads the stored buffers (no converted copy; float32
  reference arithmetic); more rows dequantize tile by tile to bf16 (a host with fast bf16) or
  float32 (any other) for one GEMM per tile;
- ``int4pack`` (CPU, 4-bit, groups of 32..256, a host with fast bf16): up to
  :data:`INT4PACK_MAX_ROWS` rows per call through torch's int4pack kernel
  (:mod:`quantsink.weights.cpu_int4`, bf16 activations); more rows (prefill) dequantize tile
  by tile to bf16 and use a bf16 GEMM, where the kernel's per-row cost would dominate;
- ``triton`` (CUDA, 4-bit): the fused W4A16 kernel through ``quantsink::quant_linear``;
- ``reference`` (everything else: 8-bit weights, other devices and group sizes): the torch
  reference, dequantizing tile by tile in float32 on every call.

``auto`` takes the first that applies, else ``reference``, and a CPU layer that ends there is
said once per reason in the log (no compiler, the build's first error, the bit width, the group
size): never silently slow. Forcing a backend that cannot run raises. A plan holds what the backend derived from the buffers (the converted int4pack
tensors, the kept-channel index on the device); it is rebuilt when the device, the buffers
(storage or in-place version) or the requested backend change, and never holds a dense weight.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from quantsink.errors import check
from quantsink.weights.cpu_int4 import Int4Pack, convert, kernel_problem, layer_problem
from quantsink.weights.selection import (BACKENDS, ENV, forced_backend,  # noqa: F401  (public here)
                                         requested_backend, use_backend)

INT4PACK_MAX_ROWS = 64  # above: tile dequant + bf16 GEMM is faster (measured on SmolLM2 shapes)
_WARNED: set[str] = set()  # reasons already logged for CPU layers on the reference path
log = logging.getLogger("quantsink")
_KEYED = ("weight_packed", "weight_scale", "weight_zero_point", "outlier_idx", "outlier_weight")


@dataclass
class Plan:
    """A backend bound to one layer's buffers on one device.

    ``eager(x)`` calls the implementation directly (no dispatcher round trip on the decode
    path); ``traced(x)`` goes through the ``torch.ops.quantsink`` op (for ``torch.compile``).
    Both compute the same function.
    """

    kind: str
    device: torch.device
    forced: str | None  # use_backend() at build time
    tensors: tuple  # the buffers it was built from, their versions, and the bias:
    versions: tuple
    bias: torch.Tensor | None
    eager: Callable[[torch.Tensor], torch.Tensor]
    traced: Callable[[torch.Tensor], torch.Tensor]
    int4: Int4Pack | None = None
    fused: bool = False  # the plan reads a sibling group's shared call (fusion)
    name: str = ""  # the path: kind, with the CPU ISA level for ``cpu`` (QuantLinear.kernel)

    def valid(self, layer: Any, device: torch.device) -> bool:
        """Same device, same requested backend, same buffer objects at the same versions."""
        b, (p, s, z, i, o), (vp, vs, vz, vi, vo) = layer._buffers, self.tensors, self.versions
        return (device == self.device and forced_backend() == self.forced
                and b["weight_packed"] is p and b["weight_scale"] is s
                and b["weight_zero_point"] is z and b["outlier_idx"] is i
                and b["outlier_weight"] is o and layer._parameters.get("bias") is self.bias
                and p._version == vp and s._version == vs and z._version == vz
                and i._version == vi and o._version == vo)


def _problem(kind: str, layer: Any, device: torch.device) -> str | None:
    """Why ``kind`` cannot run ``layer`` on ``device``, or None."""
    if kind == "reference":
        return None
    if kind == "cpu":
        if device.type != "cpu":
            return f"the cpu kernel runs on the CPU, not {device.type}"
        from quantsink.weights.cpu_w4 import layer_problem as w4_problem

        return w4_problem(layer.bits, layer.group_size)
    if kind == "int4pack":
        if device.type != "cpu":
            return f"the int4pack kernel runs on the CPU, not {device.type}"
        return layer_problem(layer.bits, layer.group_size)
    if device.type != "cuda":
        return f"the triton kernel runs on CUDA, not {device.type}"
    if layer.bits != 4:
        return f"{layer.bits}-bit weights (the triton kernel takes 4)"
    from importlib.util import find_spec

    return None if find_spec("triton") is not None else "triton is not installed"


def choose(layer: Any, device: torch.device) -> str:
    """The backend that runs ``layer`` on ``device`` (raises if a forced one cannot)."""
    name = requested_backend()
    if name != "auto":
        why = _problem(name, layer, device)
        check(why is None, f"weight backend {name!r} cannot run {layer.extra_repr()}: {why}; "
                           f"allowed: {ENV}=auto or reference")
        return name
    for kind in ("cpu", "int4pack", "triton"):
        if _problem(kind, layer, device) is None:
            return kind
    if device.type == "cpu":
        warn_reference(_problem("cpu", layer, device) or "?")
    return "reference"


def warn_reference(why: str) -> None:
    """Log once per ``why`` that CPU layers take the torch reference path (dequantize per call)."""
    if why not in _WARNED:
        _WARNED.add(why)
        log.warning("quantsink: QuantLinear layers on the CPU take the torch reference path "
                    "(dequantized on every call, slow): %s", why)


def plan_name(kind: str, layer: Any) -> str:
    """What :attr:`QuantLinear.kernel` reports for a plan of ``kind``."""
    if kind == "cpu":
        from quantsink.weights.cpu_w4 import kernel_name

        return kernel_name(layer.group_size)
    return kind


def build_plan(layer: Any, device: torch.device, kind: str | None = None) -> Plan:
    """The plan of ``layer`` on ``device`` (backend ``kind``, default: :func:`choose`)."""
    from quantsink.weights.ops import ops
    from quantsink.weights.outliers import split_columns

    ops()  # define the torch.ops.quantsink ops (once per process)
    kind = kind or choose(layer, device)
    keep = split_columns(layer.in_features, layer.outlier_idx.cpu()).to(device)
    args = (layer.weight_packed, layer.weight_scale, layer.weight_zero_point, keep,
            layer.outlier_idx, layer.outlier_weight, layer.bias, layer.bits, layer.group_size)
    int4 = None
    if kind == "cpu":
        eager, traced = _w4_calls(layer, args)
    elif kind == "int4pack":
        int4 = convert(*args[:6], layer.group_size, layer.in_features)
        eager, traced = _int4_calls(int4, args, layer.out_features)
    elif kind == "triton":  # the op's CUDA implementation is the triton kernel
        eager = traced = functools.partial(_op, *args)
    else:  # reference: the op on CUDA would be triton, so call the function there
        eager = functools.partial(_reference, *args)
        traced = eager if device.type == "cuda" else functools.partial(_op, *args)
    return bound_plan(layer, device, kind, eager, traced, int4)


def bound_plan(layer: Any, device: torch.device, kind: str, eager: Callable, traced: Callable,
               int4: Int4Pack | None = None, fused: bool = False) -> Plan:
    """A :class:`Plan` of ``layer`` valid for its current buffers (``eager``/``traced`` given)."""
    tensors = tuple(layer._buffers[n] for n in _KEYED)
    return Plan(kind, device, forced_backend(), tensors, tuple(t._version for t in tensors),
                layer._parameters.get("bias"), eager, traced, int4, fused, plan_name(kind, layer))


def _reference(*args: Any) -> torch.Tensor:
    from quantsink.weights.qmatmul import quant_linear_ref

    *params, x = args
    return quant_linear_ref(x, *params)


def _op(*args: Any) -> torch.Tensor:
    *params, x = args
    return torch.ops.quantsink.quant_linear(x, *params)  # defined by build_plan


def _int4_calls(p: Int4Pack, args: tuple, out_features: int) -> tuple[Callable, Callable]:
    """(eager, traced) callables of an int4pack plan; many rows take the bf16 tiled path."""
    from quantsink.weights.cpu_int4 import int4pack_linear_cpu
    from quantsink.weights.qmatmul import quant_linear_ref

    int4_op, ref_op = torch.ops.quantsink.int4pack_linear, torch.ops.quantsink.quant_linear
    kargs = (p.packed, p.scales_zeros, p.gather_idx, p.outlier_idx, p.outlier_weight_t,
             args[6], args[8], out_features, p.pad)

    def eager(x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= INT4PACK_MAX_ROWS * x.shape[-1]:
            return int4pack_linear_cpu(x, *kargs)
        return quant_linear_ref(x, *args, torch.bfloat16)

    def traced(x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= INT4PACK_MAX_ROWS * x.shape[-1]:
            return int4_op(x, *kargs)
        return ref_op(x, *args, torch.bfloat16)

    return eager, traced


def tile_dtype() -> torch.dtype:
    """The compute dtype of the many-rows (prefill) tiled GEMM on CPU: bf16 where the host has
    fast bf16, else float32 (a bf16 GEMM without bf16 hardware is several times slower)."""
    return torch.bfloat16 if kernel_problem() is None else torch.float32


def _w4_calls(layer: Any, args: tuple) -> tuple[Callable, Callable]:
    """(eager, traced) callables of a cpu (W4A32) plan; many rows take the tiled path."""
    from quantsink.weights import cpu_w4
    from quantsink.weights.qmatmul import quant_linear_ref

    gather, n_q, g = cpu_w4.gather_index(layer), args[3].numel(), layer.group_size
    tensors = cpu_w4.layer_tensors([layer])
    w4_op, ref_op = torch.ops.quantsink.w4_linear, torch.ops.quantsink.quant_linear
    tile = tile_dtype()  # probed now, not inside a compiled graph

    def eager(x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= cpu_w4.W4_MAX_ROWS * x.shape[-1]:
            return cpu_w4.w4_linear_cpu(x, gather, n_q, g, tensors)[0]
        return quant_linear_ref(x, *args, tile)

    def traced(x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= cpu_w4.W4_MAX_ROWS * x.shape[-1]:
            return w4_op(x, args[0], args[1], args[2], gather, args[5], args[6], n_q, g)
        return ref_op(x, *args, tile)

    return eager, traced
