"""Packed int2/int4/int8 quantization primitives for the KV cache (plain torch; the spec).

Bit layout ("planar"): a row of ``D`` codes of ``bits`` bits is stored in ``D * bits / 8``
bytes. With ``per = 8 // bits`` codes per byte and ``P = D // per`` bytes per row, byte
``j`` holds code ``i * P + j`` at bits ``[i * bits, (i + 1) * bits)`` for ``i < per``. So
the low nibble of every byte holds the first half of the row and the high nibble the
second half (int4); int2 holds the four quarters. A kernel unpacks a ``[T, P]`` tile
with shifts and masks into ``per`` contiguous ``[T, P]`` slices of the row, no shuffles.

Quantization is asymmetric with fp16 ``scale`` and ``zero`` (the group minimum):
``x ~= code * scale + zero`` with ``code`` in ``[0, 2**bits - 1]``. Values may instead be
symmetric (``zero is None``): the scale is the group's absolute maximum over
``(2**bits - 1) / 2`` and the zero is implied, ``zero = -scale * (2**bits - 1) / 2``, so only
the scale is stored (int2 with groups of 64: 2.25 bits instead of 2.5).

- Keys: per channel, in groups of ``G`` tokens: ``scale``/``zero`` are ``[B, H, (off + T) // G, D]``.
  ``off`` (``PackedBlock.offset``, ``0 <= off < G``) shortens the first group to ``G - off``
  tokens, so token ``t`` of the block is in group ``(off + t) // G``. The cache uses it to
  let the fp16 sinks fill the first group's slots: groups then end on multiples of ``G``
  counted from position 0 and no unfinished key group is left in fp16 at such a length.
  Keys may also carry ``k`` fp16 outliers per channel and group (:mod:`quantsink.kv.outliers`).
- Values: per token, in groups of ``G`` channels: ``scale``/``zero`` are ``[B, H, T, D // G]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantsink.errors import check
from quantsink.kv import outliers as outliers_mod


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., D]`` into bytes ``[..., D * bits // 8]`` (planar layout)."""
    per = 8 // bits
    check(codes.shape[-1] % per == 0, f"last dim {codes.shape[-1]} must be a multiple of {per}")
    if per == 1:
        return codes.to(torch.uint8)
    parts = codes.to(torch.uint8).unflatten(-1, (per, -1))  # [..., per, P]
    out = parts[..., 0, :].clone()
    for i in range(1, per):
        out |= parts[..., i, :] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: bytes ``[..., P]`` to uint8 codes ``[..., P * 8 // bits]``."""
    per = 8 // bits
    if per == 1:
        return packed
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.cat(parts, dim=-1)


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def _quant_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 bits: int) -> tuple[torch.Tensor, ...]:
    """Codes, fp16 scale and fp16 zero for the range ``[lo, hi]`` (broadcast against ``x``)."""
    qmax = (1 << bits) - 1
    lo = lo.to(torch.float16)
    scale = ((hi - lo.float()) / qmax).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round((x.float() - lo.float()) / scale.float()).clamp_(0, qmax).to(torch.uint8)
    return codes, scale, lo


def _minmax_quant(x: torch.Tensor, dim: int, bits: int, clip: bool = False) -> tuple[torch.Tensor, ...]:
    """Asymmetric quantization along ``dim``; returns codes, fp16 scale, fp16 zero.

    ``clip=False``: the range is the group min/max. ``clip=True``: the range is the min/max
    shrunk by the ratio of :data:`CLIP_RATIOS` with the least squared error per group (the
    stored format is unchanged, so kernels need not know).
    """
    x = x.float()
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    best = _quant_range(x, lo, hi, bits)
    if not clip:
        return best
    best_err = _group_error(x, best, dim)
    for r in CLIP_RATIOS[1:]:
        cand = _quant_range(x, lo * r, hi * r, bits)
        err = _group_error(x, cand, dim)
        better = err < best_err  # [..., 1, ...] per group
        best = tuple(torch.where(better, c, b) for c, b in zip(cand, best))
        best_err = torch.minimum(err, best_err)
    return best


def _group_error(x: torch.Tensor, q: tuple[torch.Tensor, ...], dim: int) -> torch.Tensor:
    codes, scale, zero = q
    return (codes.float() * scale.float() + zero.float() - x).square().sum(dim=dim, keepdim=True)


@dataclass
class PackedBlock:
    """Packed codes with their scales and zeros.

    ``axis="token"``: keys, groups of ``group_size`` tokens per channel.
    ``axis="channel"``: values, groups of ``group_size`` channels per token.
    """

    codes: torch.Tensor  # uint8 [B, H, T, D * bits // 8]
    scale: torch.Tensor  # fp16: keys [B, H, T // G, D]; values [B, H, T, D // G]
    zero: torch.Tensor | None  # fp16, same shape as scale; None: symmetric (implied zero)
    bits: int
    group_size: int
    axis: str
    offset: int = 0  # keys only: phantom tokens before the first (shortened) group
    outlier_idx: torch.Tensor | None = None  # keys only: uint8/int16 [B, H, n_groups, k, D] (see outliers)
    outlier_delta: torch.Tensor | None = None  # fp16, same shape: exact minus dequantized

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[-2]

    def nbytes(self) -> int:
        parts = (self.codes, self.scale, self.zero, self.outlier_idx, self.outlier_delta)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def zero_or_implied(self) -> torch.Tensor:
        """The stored zero, or the implied ``-scale * (2**bits - 1) / 2`` of a symmetric block."""
        if self.zero is not None:
            return self.zero
        return (self.scale.float() * (-((1 << self.bits) - 1) / 2)).to(self.scale.dtype)


def quantize_keys(k: torch.Tensor, bits: int, group_size: int, clip: bool = False,
                  offset: int = 0, outliers: int = 0) -> PackedBlock:
    """Quantize keys ``[B, H, T, D]`` per channel in groups of ``group_size`` tokens.

    ``offset + T`` must be a multiple of ``group_size`` (the cache flushes whole groups);
    the first group holds ``group_size - offset`` tokens.
    ``clip``: search a per-group clipping ratio (see :func:`_minmax_quant`).
    ``outliers``: per group and channel, this many fp16 outliers (see :mod:`.outliers`).
    """
    B, H, T, D = k.shape
    check(0 <= offset < group_size, f"key offset {offset} must be in [0, {group_size})")
    check((offset + T) % group_size == 0,
          f"key tokens {T} + offset {offset} must be a multiple of the group size {group_size}")
    if offset:  # phantoms at the first group's mean: never its min, max or an outlier
        k = torch.cat([k[:, :, :group_size - offset].mean(2, keepdim=True).expand(B, H, offset, D), k], dim=2)
    n = offset + T
    grouped = k.float().reshape(B, H, n // group_size, group_size, D)  # [B, H, n/G, G, D]
    idx = delta = None
    if outliers:
        idx = outliers_mod.select(grouped, outliers)
        codes, scale, zero = _quant_range(grouped, *outliers_mod.inlier_range(grouped, idx), bits)
        delta = outliers_mod.corrections(grouped, codes * scale.float() + zero.float(), idx)
        idx = idx.to(outliers_mod.slot_dtype(group_size))
    else:
        codes, scale, zero = _minmax_quant(grouped, dim=3, bits=bits, clip=clip)
    codes = codes.reshape(B, H, n, D)[:, :, offset:]
    return PackedBlock(pack(codes, bits), scale.squeeze(3), zero.squeeze(3), bits, group_size, "token",
                       offset, idx, delta)


def quantize_values(v: torch.Tensor, bits: int, group_size: int, clip: bool = False,
                    symmetric: bool = False) -> PackedBlock:
    """Quantize values ``[B, H, T, D]`` per token in groups of ``group_size`` channels.

    ``symmetric``: store the scale only (see the module docstring); ``clip`` is ignored then.
    """
    B, H, T, D = v.shape
    group_size = min(group_size, D)
    check(D % group_size == 0, f"head_dim {D} must be a multiple of the value group size {group_size}")
    grouped = v.float().reshape(B, H, T, D // group_size, group_size)  # [B, H, T, D/G, G]
    if symmetric:  # x ~= (code - half) * scale
        half = ((1 << bits) - 1) / 2
        scale = (grouped.abs().amax(dim=4, keepdim=True) / half).to(torch.float16)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.round(grouped / scale.float() + half).clamp_(0, 2 * half).to(torch.uint8)
        zero = None
    else:
        codes, scale, zero = _minmax_quant(grouped, dim=4, bits=bits, clip=clip)
        zero = zero.squeeze(4)
    codes = codes.reshape(B, H, T, D)
    return PackedBlock(pack(codes, bits), scale.squeeze(4), zero, bits, group_size, "channel")


def dequantize(block: PackedBlock, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize a :class:`PackedBlock` to ``[B, H, T, D]`` in ``dtype``."""
    codes = unpack(block.codes, block.bits).to(dtype)  # [B, H, T, D]
    B, H, T, D = codes.shape
    if block.axis == "token":
        off = block.offset
        codes = torch.cat([codes.new_zeros(B, H, off, D), codes], dim=2) if off else codes
        shape = (B, H, (off + T) // block.group_size, block.group_size, D)
        x = codes.reshape(shape) * block.scale.to(dtype).unsqueeze(3) + block.zero.to(dtype).unsqueeze(3)
        if block.outlier_idx is not None:
            x = outliers_mod.apply(x, block.outlier_idx, block.outlier_delta)
        return x.reshape(B, H, off + T, D)[:, :, off:]
    else:
        shape = (B, H, T, D // block.group_size, block.group_size)
        zero = block.zero_or_implied()
        x = codes.reshape(shape) * block.scale.to(dtype).unsqueeze(4) + zero.to(dtype).unsqueeze(4)
    return x.reshape(B, H, T, D)


def cat_blocks(a: PackedBlock | None, b: PackedBlock) -> PackedBlock:
    """Append ``b`` after ``a`` along the token axis (no re-quantization)."""
    if a is None:
        return b
    check(b.offset == 0, "only the first key block of a cache may have an offset")
    check((a.zero is None) == (b.zero is None), "cannot append symmetric and asymmetric blocks")
    zero = None if a.zero is None else torch.cat([a.zero, b.zero], 2)
    idx, delta = a.outlier_idx, a.outlier_delta
    if idx is not None:
        idx, delta = torch.cat([idx, b.outlier_idx], 2), torch.cat([delta, b.outlier_delta], 2)
    return PackedBlock(torch.cat([a.codes, b.codes], 2), torch.cat([a.scale, b.scale], 2),
                       zero, a.bits, a.group_size, a.axis, a.offset, idx, delta)


def slice_block(block: PackedBlock, start: int, stop: int) -> PackedBlock:
    """Tokens ``[start, stop)`` of ``block`` (for keys both must be group boundaries)."""
    off = 0
    if block.axis == "token":
        g, off = block.group_size, block.offset
        check((start == 0 or (off + start) % g == 0) and (off + stop) % g == 0,
              f"key slice [{start}, {stop}) is not group aligned ({g}, offset {off})")
        s_lo, s_hi = (off + start) // g, (off + stop) // g
        off = off if start == 0 else 0
    else:
        s_lo, s_hi = start, stop
    def part(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[:, :, s_lo:s_hi]

    return PackedBlock(block.codes[:, :, start:stop], part(block.scale), part(block.zero), block.bits,
                       block.group_size, block.axis, off, part(block.outlier_idx), part(block.outlier_delta))


def map_rows(block: PackedBlock, fn) -> PackedBlock:
    """``block`` with ``fn`` (a map over the batch dim, e.g. ``index_select(0, idx)``) applied to
    every tensor."""
    def part(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else fn(t)

    return PackedBlock(fn(block.codes), fn(block.scale), part(block.zero), block.bits, block.group_size,
                       block.axis, block.offset, part(block.outlier_idx), part(block.outlier_delta))
