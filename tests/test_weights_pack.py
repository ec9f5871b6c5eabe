"""Bit packing and group grids: exact round trips, partial groups, SQNR bounds."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantsink.errors import QuantsinkError
from quantsink.weights.pack import pack_codes, packed_width, unpack_codes
from quantsink.weights.rtn import dequantize_codes, group_params, n_groups, rtn_quantize


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([4, 8]), out=st.integers(1, 5), n=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_pack_round_trip_any_width(bits: int, out: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out, n), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (out, packed_width(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n).long(), codes)


def test_pack_layout_is_little_end_first() -> None:
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 9]])
    packed = pack_codes(codes, 4)
    assert packed.shape == (1, 2)
    expected = sum(int(c) << (4 * i) for i, c in enumerate(codes[0, :8].tolist()))
    assert int(packed[0, 0]) == expected - 2**32  # top nibble 15 -> negative int32
    assert int(packed[0, 1]) == 9


def test_pack_rejects_out_of_range_codes() -> None:
    with pytest.raises(QuantsinkError, match="out of range"):
        pack_codes(torch.tensor([[16]]), 4)


@pytest.mark.parametrize("n,group", [(576, 128), (576, 64), (1536, 128), (100, 32)])
def test_partial_last_group_round_trip(n: int, group: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(48, n)
    codes, scale, zero = rtn_quantize(w, 4, group, symmetric=False, clip_search=False)
    assert scale.shape == (48, n_groups(n, group)) == zero.shape
    deq = dequantize_codes(unpack_codes(pack_codes(codes, 4), 4, n), scale, zero, group)
    assert torch.equal(deq, dequantize_codes(codes, scale, zero, group))
    # every element lies within half a step of its group's grid
    step = scale.repeat_interleave(group, dim=1)[:, :n]
    # the grid spans [min(w, 0), max(w, 0)] up to the rounding of the zero point (half a step)
    err = (deq - w).abs() / step
    assert float(err.max()) <= 1.0 + 1e-4 and 0.2 < float(err.mean()) < 0.3


@pytest.mark.parametrize("bits,symmetric,lo_db,hi_db", [
    (4, False, 18.0, 23.0), (4, True, 16.0, 22.0), (8, False, 42.0, 48.0), (8, True, 40.0, 47.0)])
def test_rtn_sqnr_bounds_on_gaussian(bits: int, symmetric: bool, lo_db: float, hi_db: float) -> None:
    torch.manual_seed(1)
    w = torch.randn(256, 576)
    codes, scale, zero = rtn_quantize(w, bits, 64, symmetric, clip_search=False)
    s = sqnr_db(w, dequantize_codes(codes, scale, zero, 64))
    assert lo_db < s < hi_db, s


def test_clip_search_never_worse_than_minmax() -> None:
    torch.manual_seed(2)
    w = torch.randn(128, 576) * torch.rand(1, 576) ** 3  # heavy-tailed columns
    plain = dequantize_codes(*rtn_quantize(w, 4, 128, False, clip_search=False), 128)
    searched = dequantize_codes(*rtn_quantize(w, 4, 128, False, clip_search=True), 128)
    assert (searched - w).pow(2).sum() <= (plain - w).pow(2).sum()


def test_symmetric_zero_point_is_midpoint_and_scales_are_fp16() -> None:
    w = torch.randn(8, 70)
    scale, zero = group_params(w, 4, 32, symmetric=True, clip_search=False)
    assert torch.all(zero == 8)
    assert torch.equal(scale, scale.half().float())
