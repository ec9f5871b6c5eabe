"""Orthogonal tricks that live outside the kernel contract.

- :func:`hadamard`: a normalized Sylvester Hadamard matrix ``H`` (``H @ H.T = I``). The
  cache stores ``k @ H`` and ``v @ H`` and attends with ``q @ H``: ``q . k`` is unchanged
  and the output is rotated back with ``H.T``. The rotation spreads outlier channels over
  all of head_dim, which makes per-group quantization much less lossy at 2 bits.
StreamingLLM's RoPE shift of the sink queries lives in :mod:`quantsink.hf.rope` (it uses the
model's own rotary embedding).
"""
from __future__ import annotations

import functools

import torch

from quantsink.errors import check


@functools.lru_cache(maxsize=8)
def _hadamard_cpu(dim: int) -> torch.Tensor:
    check(dim > 0 and dim & (dim - 1) == 0,
          f"kv_cache.rotate needs head_dim to be a power of two, got {dim}; allowed: rotate: false")
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / dim ** 0.5


def hadamard(dim: int, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalized ``[dim, dim]`` Hadamard matrix (symmetric and orthogonal); dim a power of two."""
    return _hadamard_cpu(dim).to(device=device, dtype=dtype)
