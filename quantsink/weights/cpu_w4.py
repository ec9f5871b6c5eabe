"""CPU W4A32 kernel: a QuantLinear straight from its stored buffers (``kernels/cpu_w4_linear.cpp``).

The C++ extension (:mod:`quantsink.kernels.cpu_ext`) reads ``weight_packed``,
``weight_scale``, ``weight_zero_point`` and ``outlier_weight`` as the checkpoint stores them:
nothing is converted, so the model holds its weights once. It computes the float32 reference
(:func:`~quantsink.weights.qmatmul.quant_linear_ref`) up to summation order: ``(code - zero)``
is exact, each group's partial dot product is scaled once, the fp16 outlier columns join the
same accumulator. Layers that read the same input (q/k/v, gate/up) go through one call, which
gathers ``x`` once (:mod:`quantsink.weights.fusion`).

It re-reads the weights for every input row, so it serves decode (up to
:data:`W4_MAX_ROWS` rows); prefill goes through bf16 tiles and a GEMM. It needs the
extension (any ISA level: AVX-512, AVX2 or portable C++), 4-bit weights and an even group
size; groups of a multiple of two vectors (32 on AVX-512, 16 elsewhere) take the vector loop,
others the scalar one (:func:`kernel_name` says which).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

W4_MAX_ROWS = 32  # above: bf16 tiles + GEMM are faster (SmolLM2 shapes: 1.7-1.9 vs 2.3-2.8 ms at 32)
_EMPTY = torch.empty(0)


@functools.cache
def _host_problem() -> str | None:
    from quantsink.kernels import cpu_ext

    why = cpu_ext.unavailable_reason()
    return None if why is None else f"the C++ CPU extension is not available ({why})"


def layer_problem(bits: int, group_size: int) -> str | None:
    """Why a layer cannot use the kernel on this host, or None (every ISA level takes it)."""
    if bits != 4:
        return f"{bits}-bit weights (the kernel takes 4)"
    if group_size % 2:
        return f"group_size {group_size} (the kernel takes even group sizes)"
    return _host_problem()


def kernel_name(group_size: int) -> str:
    """The path a layer of ``group_size`` takes: ``cpu-w4a32[<level>]`` (vector loop: the group
    is a multiple of two vectors of the level) or ``cpu-w4a32[<level>,scalar]`` (the scalar loop)."""
    from quantsink.kernels import cpu_ext

    level = cpu_ext.selected_level()
    return f"cpu-w4a32[{level}{'' if group_size % (2 * cpu_ext.LANES[level]) == 0 else ',scalar'}]"


def gather_index(layer: Any) -> torch.Tensor:
    """int64 ``[n_q + k]``: the kept input channels, then the outlier channels (empty: x as is)."""
    from quantsink.weights.outliers import split_columns

    if not layer.n_outliers:
        return _EMPTY.long()
    keep = split_columns(layer.in_features, layer.outlier_idx.cpu())
    return torch.cat([keep.long(), layer.outlier_idx.cpu().long()])


def layer_tensors(layers: Sequence[Any]) -> tuple[list[torch.Tensor], ...]:
    """The stored buffers of ``layers`` as the kernel takes them (bias in float32 or empty)."""
    return ([m.weight_packed for m in layers], [m.weight_scale for m in layers],
            [m.weight_zero_point for m in layers], [m.outlier_weight for m in layers],
            [_EMPTY if m.bias is None else m.bias.detach().float() for m in layers])


def w4_linear_cpu(x: torch.Tensor, gather: torch.Tensor, n_q: int, group_size: int,
                  tensors: tuple[list[torch.Tensor], ...], isa: str | None = None) -> list[torch.Tensor]:
    """``x: [..., in]`` through each layer of ``tensors`` (:func:`layer_tensors` of layers
    sharing ``in``, outlier channels and group size): a list of ``[..., out_i]`` in ``x.dtype``.

    ``isa``: the ISA level to run (default: the selected one, :mod:`quantsink.kernels.cpu_ext`)."""
    from quantsink.kernels.cpu_ext import extension

    x2 = x.reshape(-1, x.shape[-1])
    cast = x2.dtype not in (torch.float32, torch.bfloat16)
    ys = extension().w4_linear(x2.float().contiguous() if cast else x2.contiguous(), gather, n_q,
                               group_size, *tensors, isa or "")
    return [(y.to(x.dtype) if cast else y).reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


def w4_linear_op(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                 weight_zero_point: torch.Tensor, gather: torch.Tensor, outlier_weight: torch.Tensor,
                 bias: torch.Tensor | None, n_q: int, group_size: int) -> torch.Tensor:
    """One layer's tensors through the kernel (the ``quantsink::w4_linear`` op's CPU body)."""
    tensors = ([weight_packed], [weight_scale], [weight_zero_point], [outlier_weight],
               [_EMPTY if bias is None else bias.float()])
    return w4_linear_cpu(x, gather, n_q, group_size, tensors)[0]
