"""Orthogonal tricks that live outside the kernel contract.

- :func:`hadamard`: a normalized Sylvester Hadamard matrix ``H`` (``H @ H.T = I``). The
  cache stores ``k @ H`` and ``v @ H`` and attends with ``q @ H``: ``q . k`` is unchanged
  and the output is rotated back with ``H.T``. The rotation spreads outlier channels over
  head_dim (over blocks of it when head_dim is not a power of two), which makes per-group
  quantization much less lossy at 2 bits.
StreamingLLM's RoPE shift of the sink queries lives in :mod:`quantsink.hf.rope` (it uses the
model's own rotary embedding).
"""
from __future__ import annotations

import functools

import torch

from quantsink.errors import check


@functools.lru_cache(maxsize=8)
def _hadamard_cpu(dim: int) -> torch.Tensor:
    check(dim > 0, f"kv_cache.rotate needs a positive head_dim, got {dim}")
    block = dim & -dim  # the largest power of two that divides dim: all of a power-of-two dim
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*[h] * (dim // block)) / block ** 0.5


def hadamard(dim: int, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalized ``[dim, dim]`` Hadamard matrix (symmetric and orthogonal).

    A head_dim that is not a power of two (Phi-3's 96, 80, 112) gets a block-diagonal one, with
    Sylvester blocks of the largest power of two that divides it (96: three blocks of 32): still
    orthogonal, so attention is unchanged; it spreads outliers within each block only.
    """
    return _hadamard_cpu(dim).to(device=device, dtype=dtype)
