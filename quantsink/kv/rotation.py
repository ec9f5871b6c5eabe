"""Orthogonal tricks that live outside the kernel contract.

- :func:`hadamard`: a normalized Sylvester Hadamard matrix ``H`` (``H @ H.T = I``). The
  cache stores ``k @ H`` and ``v @ H`` and attends with ``q @ H``: ``q . k`` is unchanged
  and the output is rotated back with ``H.T``. The rotation spreads outlier channels over
  all of head_dim, which makes per-group quantization much less lossy at 2 bits.
- :func:`rope_shift`: rotate already-RoPE'd queries by ``-shift`` positions (StreamingLLM:
  the sink region is attended as if the evicted tokens never existed).
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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoPE partner of every channel (Llama convention: halves, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_shift(q: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE'd queries ``q: [B, H, L, D]`` back by ``shift: [L]`` positions.

    ``R(p) R(-s) = R(p - s)``, so the result is ``q`` as if it sat at position ``p - s``.
    """
    angles = -shift.to(torch.float32)[:, None] * inv_freq.float()[None, :]  # [L, D/2]
    emb = torch.cat((angles, angles), dim=-1)  # [L, D]
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
    return q * cos + rotate_half(q) * sin


def find_inv_freq(model: torch.nn.Module) -> torch.Tensor | None:
    """The RoPE ``inv_freq`` buffer of ``model`` (first rotary embedding found), or None."""
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor):
            return inv.detach().float().cpu()
    return None
