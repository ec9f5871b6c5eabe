"""Bit packing of integer weight codes into int32 words (compressed-tensors style).

Layout, along the input dimension of a ``[out, n]`` code matrix with ``bits`` in {4, 8}:
``per = 32 // bits`` codes share one int32 word; code ``i`` of a row lives in word
``i // per`` at bits ``bits * (i % per)`` (least significant first). Rows are padded
with zero codes up to a multiple of ``per``. Codes are unsigned (``0 .. 2**bits - 1``);
the signed value is ``code - zero_point``. Words are stored as int32, so a word whose top
bit is set reads negative; unpacking masks after the shift, which makes that harmless.
"""
from __future__ import annotations

import torch

from quantsink.errors import check

PACK_BITS = (4, 8)


def codes_per_word(bits: int) -> int:
    """How many ``bits``-wide codes one int32 word holds."""
    check(bits in PACK_BITS, f"packing {bits}-bit codes is not supported; allowed: {list(PACK_BITS)}")
    return 32 // bits


def packed_width(n: int, bits: int) -> int:
    """Number of int32 words per row for ``n`` codes."""
    per = codes_per_word(bits)
    return (n + per - 1) // per


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[out, n]`` (any integer dtype) into int32 ``[out, ceil(n*bits/32)]``."""
    per = codes_per_word(bits)
    out, n = codes.shape
    words = packed_width(n, bits)
    c = torch.zeros(out, words * per, dtype=torch.int64, device=codes.device)
    c[:, :n] = codes.to(torch.int64)
    check(bool((c >= 0).all()) and bool((c < (1 << bits)).all()),
          f"codes out of range for {bits}-bit packing; allowed: 0..{(1 << bits) - 1}")
    c = c.view(out, words, per)  # [out, words, per]
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    packed = (c << shifts).sum(-1)  # [out, words], in 0 .. 2**32 - 1
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement wrap
    return packed.to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[out, words]`` -> uint8 codes ``[out, n]``."""
    per = codes_per_word(bits)
    out, words = packed.shape
    check(words * per >= n, f"packed tensor has {words * per} codes per row, fewer than n={n}")
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed[:, :, None] >> shifts) & ((1 << bits) - 1)  # [out, words, per]
    return c.reshape(out, words * per)[:, :n].to(torch.uint8)
