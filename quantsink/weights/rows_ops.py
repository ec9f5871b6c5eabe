"""``x @ (weight_int8 * weight_scale[:, None]).T``: the int8-rows product of the embedding/lm_head.

- CPU with fast bf16, up to :data:`INT8_MAX_ROWS` rows: ``torch._weight_int8pack_mm`` with bf16
  activations and unit scales (fp32 accumulation, one bf16 rounding), then the fp16 row scale
  in float32. The aten kernel (torch 2.13) faults (general protection fault) when x is not
  32-byte aligned, or, from 4 rows on (its blocked path), when the weight is not 16-byte
  aligned (a safetensors mmap view often is not), or ``H % 16 != 0``. So x is copied when it
  is not 64-byte aligned, and 4..8 rows on an unaligned weight take the tiled path (the
  module then keeps an aligned copy: ``Int8Embedding.aligned_rows``).
- More rows on such a CPU: tile by tile over the vocabulary, int8 rows -> bf16 (exact), bf16 GEMM.
- Anything else (other devices, ``reference`` backend): tile by tile in float32 (exact weights).

Registered as ``quantsink::int8_rows_linear`` (:mod:`quantsink.weights.ops`); eager calls go
straight to the implementation, ``torch.compile`` sees the op.
"""
from __future__ import annotations

import functools

import torch

INT8_MAX_ROWS = 8  # above: the tiled bf16 GEMM is faster (49,152 x 576, one thread)
TILE_ROWS = 4096  # vocabulary rows per dequantized tile


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


def int8_rows_cpu(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                  compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The CPU implementation (see the module docstring)."""
    h, v = x.shape[-1], weight_int8.shape[0]
    x2 = x.reshape(-1, h)
    rows = x2.shape[0]
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
    the ``reference`` backend (:func:`~quantsink.weights.backend.use_backend`) turns bf16 off
    in eager mode.
    """
    bf16 = bf16_host and x.device.type == "cpu"
    if torch.compiler.is_compiling():
        dt = torch.bfloat16 if bf16 else None
        return torch.ops.quantsink.int8_rows_linear(x, weight_int8, weight_scale, dt)
    from quantsink.weights.backend import requested_backend

    dt = torch.bfloat16 if bf16 and requested_backend() != "reference" else None
    if x.device.type == "cpu":
        return int8_rows_cpu(x, weight_int8, weight_scale, dt)
    return int8_rows_ref(x, weight_int8, weight_scale, dt)
