"""``x @ (weight_int8 * weight_scale[:, None]).T``: the int8-rows product of the embedding/lm_head.

- CPU with the C++ extension (:mod:`quantsink.kernels.cpu_ext`, every ISA level: AVX-512,
  AVX2, portable), up to :data:`INT8_MAX_ROWS` rows: its ``int8_rows`` kernel, float32
  arithmetic on the stored rows (any alignment), the reference up to summation order.
- Else a CPU with fast bf16, up to :data:`INT8_MAX_ROWS` rows: ``torch._weight_int8pack_mm`` with bf16
  activations and unit scales (fp32 accumulation, one bf16 rounding), then the fp16 row scale
  in float32. The aten kernel (torch 2.13) faults (general protection fault) when x is not
  32-byte aligned, or, from 4 rows on (its blocked path), when the weight is not 16-byte
  aligned (a safetensors mmap view often is not), or ``H % 16 != 0``. So x is copied when it
  is not 64-byte aligned, and 4..8 rows on an unaligned weight take the tiled path (the
  module then keeps an aligned copy: ``Int8Embedding.aligned_rows``).
- More rows on such a CPU: tile by tile over the vocabulary, int8 rows -> bf16 (exact), bf16 GEMM.
- Anything else (other devices, ``reference`` backend): tile by tile in float32 (exact weights);
  a CPU decode row that ends here is said once in the log, with the reason.

Registered as ``quantsink::int8_rows_linear`` (:mod:`quantsink.weights.ops`); eager calls go
straight to the implementation, ``torch.compile`` sees the op.
"""
from __future__ import annotations

import functools
import logging

import torch

from quantsink.weights.selection import requested_backend

INT8_MAX_ROWS = 8  # above: the tiled bf16 GEMM is faster (49,152 x 576, one thread)
TILE_ROWS = 4096  # vocabulary rows per dequantized tile
_WARNED: set[str] = set()
log = logging.getLogger("quantsink")


def int8_rows_ref(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                  compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Tile by tile in ``compute_dtype`` (float32 by default); ``[..., H] -> [..., V]`` in x.dtype."""
    dt = compute_dtype or torch.float32
    x2 = x.reshape(-1, x.shape[-1]).to(dt)  # [M, H]
    v = weight_int8.shape[0]
    y = torch.empty(x2.shape[0], v, dtype=torch.float32, device=x.device)
    for r0 in range(0, v, TILE_ROWS):
        r1 = min(v, r0 + TILE_ROWS)
        s = weight_scale[r0:r1].float()
        if dt == torch.float32:  # exact dequantized tile, then the product
            y[:, r0:r1] = x2 @ (weight_int8[r0:r1].float() * s[:, None]).T
        else:  # integer rows are exact in bf16; scale the rounded product in fp32
            y[:, r0:r1] = (x2 @ weight_int8[r0:r1].to(dt).T).float() * s
    return y.to(x.dtype).reshape(*x.shape[:-1], v)


def aligned(w: torch.Tensor) -> bool:
    """Whether ``torch._weight_int8pack_mm`` can read ``w: [V, H]`` safely (see the docstring)."""
    return w.is_contiguous() and w.data_ptr() % 64 == 0 and w.shape[-1] % 16 == 0


@functools.cache
def _ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bfloat16, device="cpu")


def _extension():
    from quantsink.kernels.cpu_ext import extension_or_none

    return extension_or_none()


def rows_kernel(bf16_host: bool) -> str:
    """The CPU path of a decode row: ``cpu-int8rows[<isa level>]``, ``int8pack[bf16]`` or
    ``reference`` (float32 tiles, with the reason logged once)."""
    from quantsink.kernels import cpu_ext

    if _extension() is not None:
        return f"cpu-int8rows[{cpu_ext.selected_level()}]"
    if bf16_host:
        return "int8pack[bf16]"
    why = f"the C++ CPU extension is not available ({cpu_ext.unavailable_reason()}) and the CPU has no fast bf16"
    if why not in _WARNED:
        _WARNED.add(why)
        log.warning("quantsink: int8 embedding / lm_head rows on the CPU take the float32 torch "
                    "reference path (slow): %s", why)
    return "reference"


def int8_rows_cpu(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                  compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The CPU implementation (see the module docstring)."""
    h, v = x.shape[-1], weight_int8.shape[0]
    x2 = x.reshape(-1, h)
    rows = x2.shape[0]
    ext = _extension() if rows <= INT8_MAX_ROWS and weight_int8.is_contiguous() else None
    if ext is not None and x.dtype.is_floating_point:
        y = ext.int8_rows(x2.float(), weight_int8, weight_scale)  # [M, V] float32
        return y.to(x.dtype).reshape(*x.shape[:-1], v)
    if compute_dtype != torch.bfloat16 or rows > INT8_MAX_ROWS or h % 16 or \
            not weight_int8.is_contiguous() or (rows >= 4 and not aligned(weight_int8)):
        return int8_rows_ref(x, weight_int8, weight_scale, compute_dtype)
    xb = x2.to(torch.bfloat16)
    if not xb.is_contiguous() or xb.data_ptr() % 64:
        xb = xb.clone(memory_format=torch.contiguous_format)  # fresh memory is 64-byte aligned
    y = torch._weight_int8pack_mm(xb, weight_int8, _ones(v))  # [M, V] bf16
    return torch.mul(y, weight_scale.float()).to(x.dtype).reshape(*x.shape[:-1], v)


def int8_rows_linear(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                     bf16_host: bool) -> torch.Tensor:
    """``x: [..., H] -> [..., V]`` in ``x.dtype``, with the fastest path this host allows.

    ``bf16_host``: the CPU has fast bf16 (:func:`~quantsink.weights.cpu_int4.kernel_problem`);
    the ``reference`` backend (:func:`~quantsink.weights.backend.use_backend`) takes the
    float32 reference in eager mode.
    """
    bf16 = bf16_host and x.device.type == "cpu"
    if torch.compiler.is_compiling():
        dt = torch.bfloat16 if bf16 else None
        return torch.ops.quantsink.int8_rows_linear(x, weight_int8, weight_scale, dt)
    if requested_backend() == "reference":
        return int8_rows_ref(x, weight_int8, weight_scale)
    dt = torch.bfloat16 if bf16 else None
    if x.device.type == "cpu":
        return int8_rows_cpu(x, weight_int8, weight_scale, dt)
    return int8_rows_ref(x, weight_int8, weight_scale, dt)
