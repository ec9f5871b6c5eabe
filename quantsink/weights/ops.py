"""``torch.library`` ops of the packed Linear, so eager dispatch and ``torch.compile`` share one path.

- ``quantsink::quant_linear(x, weight_packed, weight_scale, weight_zero_point, keep_idx,
  outlier_idx, outlier_weight, bias, bits, group_size, compute_dtype)``: the checkpoint's own
  tensors. Default (``CompositeExplicitAutograd``, every device): the torch reference of
  :mod:`quantsink.weights.qmatmul`, tile by tile. ``CUDA``: the Triton W4A16 kernel
  (:mod:`quantsink.kernels.w4a16`, fp16 outlier columns fused) for 4-bit weights (fp16, bf16
  or fp32 activations), the reference otherwise.
- ``quantsink::int4pack_linear(x, packed, scales_zeros, gather_idx, outlier_idx,
  outlier_weight_t, bias, group_size, out_features, pad)``: the converted CPU form of
  :mod:`quantsink.weights.cpu_int4` (``CPU`` only).
- ``quantsink::w4_linear(x, weight_packed, weight_scale, weight_zero_point, gather_idx,
  outlier_weight, bias, n_q, group_size)``: the stored 4-bit buffers through the CPU W4A32
  kernel of :mod:`quantsink.weights.cpu_w4` (``CPU`` only).
- ``quantsink::int8_rows_linear(x, weight_int8, weight_scale, compute_dtype)``: the int8 rows
  of the embedding / lm_head (:mod:`quantsink.weights.rows_ops`; ``CPU`` kernel, default:
  the tiled reference).

All have fake (meta) implementations, so ``torch.compile`` traces them as single nodes.
They are defined on first use (:func:`ops`), not at import.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

QUANT_LINEAR = ("quant_linear(Tensor x, Tensor weight_packed, Tensor weight_scale, "
                "Tensor weight_zero_point, Tensor keep_idx, Tensor outlier_idx, "
                "Tensor outlier_weight, Tensor? bias, int bits, int group_size, "
                "ScalarType? compute_dtype=None) -> Tensor")
INT4PACK_LINEAR = ("int4pack_linear(Tensor x, Tensor packed, Tensor scales_zeros, "
                   "Tensor gather_idx, Tensor outlier_idx, Tensor outlier_weight_t, "
                   "Tensor? bias, int group_size, int out_features, int pad) -> Tensor")
W4_LINEAR = ("w4_linear(Tensor x, Tensor weight_packed, Tensor weight_scale, Tensor weight_zero_point, "
             "Tensor gather_idx, Tensor outlier_weight, Tensor? bias, int n_q, int group_size) -> Tensor")
INT8_ROWS_LINEAR = ("int8_rows_linear(Tensor x, Tensor weight_int8, Tensor weight_scale, "
                    "ScalarType? compute_dtype=None) -> Tensor")
_LIBS: list[Any] = []  # keeps the Library objects (and so the registrations) alive


def _quant_linear_ref(x, weight_packed, weight_scale, weight_zero_point, keep_idx, outlier_idx,
                      outlier_weight, bias, bits, group_size, compute_dtype=None):
    from quantsink.weights.qmatmul import quant_linear_ref

    return quant_linear_ref(x, weight_packed, weight_scale, weight_zero_point, keep_idx,
                            outlier_idx, outlier_weight, bias, bits, group_size, compute_dtype)


def _quant_linear_cuda(x, weight_packed, weight_scale, weight_zero_point, keep_idx, outlier_idx,
                       outlier_weight, bias, bits, group_size, compute_dtype=None):
    if bits == 4 and compute_dtype is None and x.dtype in (torch.float16, torch.bfloat16,
                                                            torch.float32):
        from quantsink.kernels.w4a16 import w4a16_linear

        return w4a16_linear(x, weight_packed, weight_scale, weight_zero_point, keep_idx,
                            outlier_idx, outlier_weight, bias, group_size)
    return _quant_linear_ref(x, weight_packed, weight_scale, weight_zero_point, keep_idx,
                             outlier_idx, outlier_weight, bias, bits, group_size, compute_dtype)


def _quant_linear_fake(x, weight_packed, *args, **kwargs):
    return x.new_empty(*x.shape[:-1], weight_packed.shape[0])


def _int4pack_cpu(x, packed, scales_zeros, gather_idx, outlier_idx, outlier_weight_t, bias,
                  group_size, out_features, pad):
    from quantsink.weights.cpu_int4 import int4pack_linear_cpu

    return int4pack_linear_cpu(x, packed, scales_zeros, gather_idx, outlier_idx,
                               outlier_weight_t, bias, group_size, out_features, pad)


def _int4pack_fake(x, packed, scales_zeros, gather_idx, outlier_idx, outlier_weight_t, bias,
                   group_size, out_features, pad):
    return x.new_empty(*x.shape[:-1], out_features)


def _w4_cpu(x, weight_packed, weight_scale, weight_zero_point, gather_idx, outlier_weight, bias, n_q,
            group_size):
    from quantsink.weights.cpu_w4 import w4_linear_op

    return w4_linear_op(x, weight_packed, weight_scale, weight_zero_point, gather_idx, outlier_weight,
                        bias, n_q, group_size)


def _w4_fake(x, weight_packed, *args):
    return x.new_empty(*x.shape[:-1], weight_packed.shape[0])


def _int8_rows_ref(x, weight_int8, weight_scale, compute_dtype=None):
    from quantsink.weights.rows_ops import int8_rows_ref

    return int8_rows_ref(x, weight_int8, weight_scale, compute_dtype)


def _int8_rows_cpu(x, weight_int8, weight_scale, compute_dtype=None):
    from quantsink.weights.rows_ops import int8_rows_cpu

    return int8_rows_cpu(x, weight_int8, weight_scale, compute_dtype)


def _int8_rows_fake(x, weight_int8, weight_scale, compute_dtype=None):
    return x.new_empty(*x.shape[:-1], weight_int8.shape[0])


@functools.cache
def ops() -> Any:
    """``torch.ops.quantsink`` with the ops above defined (once per process)."""
    lib = torch.library.Library("quantsink", "FRAGMENT")
    lib.define(QUANT_LINEAR)
    lib.impl("quant_linear", _quant_linear_ref, "CompositeExplicitAutograd")
    lib.impl("quant_linear", _quant_linear_cuda, "CUDA")
    lib.define(INT4PACK_LINEAR)
    lib.impl("int4pack_linear", _int4pack_cpu, "CPU")
    lib.define(W4_LINEAR)
    lib.impl("w4_linear", _w4_cpu, "CPU")
    lib.define(INT8_ROWS_LINEAR)
    lib.impl("int8_rows_linear", _int8_rows_ref, "CompositeExplicitAutograd")
    lib.impl("int8_rows_linear", _int8_rows_cpu, "CPU")
    torch.library.register_fake("quantsink::quant_linear", _quant_linear_fake, lib=lib)
    torch.library.register_fake("quantsink::int4pack_linear", _int4pack_fake, lib=lib)
    torch.library.register_fake("quantsink::w4_linear", _w4_fake, lib=lib)
    torch.library.register_fake("quantsink::int8_rows_linear", _int8_rows_fake, lib=lib)
    _LIBS.append(lib)
    return torch.ops.quantsink
