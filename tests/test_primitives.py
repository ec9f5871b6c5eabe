"""Property tests of the packed KV primitives (the spec the Triton kernel follows)."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantsink.kv.primitives import (cat_blocks, dequantize, pack, quantize_keys, quantize_values,
                                     slice_block, unpack)

BITS = st.sampled_from([2, 4, 8])


@settings(max_examples=60, deadline=None)
@given(bits=BITS, rows=st.integers(1, 5), per_row=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits: int, rows: int, per_row: int, seed: int) -> None:
    D = per_row * (8 // bits)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, D), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (rows, D * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


def test_planar_layout_documented() -> None:
    """Byte j holds code i * P + j at bits [i * bits, (i + 1) * bits)."""
    codes = torch.tensor([[1, 2, 3, 0, 3, 2, 1, 0]], dtype=torch.uint8)  # int2: P = 2 bytes
    packed = pack(codes, 2)
    # byte 0: codes 0, 2, 4, 6 = 1, 3, 3, 1; byte 1: codes 1, 3, 5, 7 = 2, 0, 2, 0
    assert packed.tolist() == [[1 | 3 << 2 | 3 << 4 | 1 << 6, 2 | 0 << 2 | 2 << 4 | 0 << 6]]
    nib = pack(torch.tensor([[5, 9, 12, 3]], dtype=torch.uint8), 4)
    assert nib.tolist() == [[5 | 12 << 4, 9 | 3 << 4]]


def _bound(block, x: torch.Tensor) -> torch.Tensor:
    """scale / 2 per element, broadcast to ``x`` (plus fp16 rounding of the zero)."""
    B, H, T, D = x.shape
    if block.axis == "token":
        s = block.scale.float().repeat_interleave(block.group_size, dim=2)
    else:
        s = block.scale.float().repeat_interleave(block.group_size, dim=3)
    return s / 2 + 1e-3 * x.abs().amax() + 1e-6


@settings(max_examples=40, deadline=None)
@given(bits=BITS, groups=st.integers(1, 3), g=st.sampled_from([8, 16, 32]),
       heads=st.integers(1, 3), scale=st.floats(0.01, 50.0), seed=st.integers(0, 2**16))
def test_key_error_bound(bits: int, groups: int, g: int, heads: int, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(2, heads, groups * g, 16, generator=gen) * scale
    block = quantize_keys(k, bits, g)
    assert block.scale.shape == (2, heads, groups, 16)
    err = (dequantize(block) - k).abs()
    assert bool((err <= _bound(block, k)).all())


@settings(max_examples=40, deadline=None)
@given(bits=BITS, tokens=st.integers(1, 20), g=st.sampled_from([8, 16, 32]),
       scale=st.floats(0.01, 50.0), seed=st.integers(0, 2**16), symmetric=st.booleans())
def test_value_error_bound(bits: int, tokens: int, g: int, scale: float, seed: int,
                           symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(1, 2, tokens, 32, generator=gen) * scale
    block = quantize_values(v, bits, g, symmetric=symmetric)
    assert block.scale.shape == (1, 2, tokens, 32 // g)
    assert (block.zero is None) == symmetric
    err = (dequantize(block) - v).abs()
    assert bool((err <= _bound(block, v)).all())


def test_symmetric_values_store_no_zero() -> None:
    """int2, groups of 64: 2.25 bits per value symmetric against 2.5 asymmetric."""
    v = torch.randn(1, 1, 16, 64)
    sym, asym = quantize_values(v, 2, 64, symmetric=True), quantize_values(v, 2, 64)
    assert 8 * sym.nbytes() / v.numel() == 2.25 and 8 * asym.nbytes() / v.numel() == 2.5
    grouped_max = v.abs().amax(-1)
    assert torch.allclose(dequantize(sym).abs().amax(-1), grouped_max, rtol=2e-3)  # extremes exact


@settings(max_examples=30, deadline=None)
@given(bits=BITS, offset=st.integers(0, 15), groups=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_key_offset_shortens_the_first_group(bits: int, offset: int, groups: int, seed: int) -> None:
    """With an offset the first group holds G - offset tokens and is quantized on its own."""
    G = 16
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, groups * G - offset, 8, generator=gen)
    block = quantize_keys(k, bits, G, offset=offset)
    assert block.scale.shape[2] == groups and block.num_tokens == k.shape[2]
    first = quantize_keys(k[:, :, :G - offset].contiguous(), bits, G - offset)
    torch.testing.assert_close(dequantize(block)[:, :, :G - offset], dequantize(first))
    assert bool(((dequantize(block) - k).abs() <= _bound_offset(block, k)).all())
    rest = slice_block(block, G - offset, k.shape[2])
    assert rest.offset == 0 and torch.equal(dequantize(rest), dequantize(block)[:, :, G - offset:])


def _bound_offset(block, x: torch.Tensor) -> torch.Tensor:
    s = block.scale.float().repeat_interleave(block.group_size, dim=2)[:, :, block.offset:]
    return s / 2 + 1e-3 * x.abs().amax() + 1e-6


def test_clip_search_never_worse_than_minmax() -> None:
    k = torch.randn(1, 2, 64, 32) * torch.linspace(0.1, 5, 32)
    k[0, 0, 3, 5] = 40.0  # an outlier makes min/max wasteful
    plain = (dequantize(quantize_keys(k, 2, 32)) - k).square().sum()
    clipped = (dequantize(quantize_keys(k, 2, 32, clip=True)) - k).square().sum()
    assert clipped < plain


def test_cat_and_slice_blocks_match_whole() -> None:
    k = torch.randn(1, 2, 96, 16)
    whole = quantize_keys(k, 4, 32)
    parts = cat_blocks(quantize_keys(k[:, :, :32], 4, 32), quantize_keys(k[:, :, 32:], 4, 32))
    assert torch.equal(dequantize(parts), dequantize(whole))
    tail = slice_block(whole, 32, 96)
    assert torch.equal(dequantize(tail), dequantize(whole)[:, :, 32:])
    v = quantize_values(k, 2, 8)
    assert torch.equal(dequantize(slice_block(v, 5, 50)), dequantize(v)[:, :, 5:50])


@settings(max_examples=25, deadline=None)
@given(outliers=st.integers(1, 3), offset=st.sampled_from([0, 4]), seed=st.integers(0, 2**16))
def test_key_outliers_shrink_the_range_and_are_kept(outliers: int, offset: int, seed: int) -> None:
    """k extreme entries per channel and group leave the range and come back (nearly) exact."""
    G = 32
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, 2 * G - offset, 16, generator=gen)
    k[0, 1, 9, 3] = 25.0  # a spike in channel 3 of head 1
    plain, sparse = quantize_keys(k, 2, G, offset=offset), quantize_keys(k, 2, G, offset=offset, outliers=outliers)
    assert sparse.outlier_idx.shape == (1, 2, 2, outliers, 16) and sparse.outlier_idx.dtype == torch.uint8
    assert bool((sparse.scale <= plain.scale + 1e-3).all())  # never a wider range
    assert sparse.scale[0, 1, 0, 3] < plain.scale[0, 1, 0, 3] / 4  # the spike no longer sets it
    deq = dequantize(sparse)
    assert abs(deq[0, 1, 9, 3].item() - 25.0) < 0.02  # kept in fp16
    assert (deq - k).square().sum() < (dequantize(plain) - k).square().sum()
    assert sparse.nbytes() - plain.nbytes() == 2 * 2 * outliers * 16 * 3  # uint8 slot + fp16 delta
    halves = cat_blocks(slice_block(sparse, 0, G - offset), slice_block(sparse, G - offset, 2 * G - offset))
    assert torch.equal(dequantize(halves), deq)


@settings(max_examples=20, deadline=None)
@given(group=st.sampled_from([16, 48, 128, 256, 257, 300, 512, 1024]), outliers=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_key_outliers_hold_any_allowed_group_size(group: int, outliers: int, seed: int) -> None:
    """The slot index holds every slot of groups up to 1024 tokens (uint8 up to 256, int16 above):
    the outliers are kept exact and the error is never worse than without them."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 1, group, 8, generator=gen)
    slot = int(torch.randint(group // 2, group, (1,), generator=gen))  # past 255 for large groups
    k[0, 0, slot, 2] = 30.0
    plain, sparse = quantize_keys(k, 2, group), quantize_keys(k, 2, group, outliers=outliers)
    assert sparse.outlier_idx.dtype == (torch.uint8 if group <= 256 else torch.int16)
    deq = dequantize(sparse)
    assert abs(deq[0, 0, slot, 2].item() - 30.0) < 0.05
    assert (deq - k).square().sum() <= (dequantize(plain) - k).square().sum()
