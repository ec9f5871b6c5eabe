"""The torch reference of the packed Linear: exact dequantization, tiles, 4 and 8 bits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quant_layers import SHAPES, make_layer

from quantsink.weights import qmatmul
from quantsink.weights.outliers import split_columns
from quantsink.weights.pack import pack_codes
from quantsink.weights.qmatmul import dequantize_rows, quant_linear_ref, unpack_rows
from quantsink.weights.rtn import dequantize_codes


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n", [1, 7, 33, 100, 560])
def test_unpack_and_dequantize_rows_are_exact(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 1 << bits, (5, n), generator=g)
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_rows(packed, bits)[:, :n].long(), codes)
    groups = -(-n // 32)
    scale = torch.rand(5, groups, generator=g).half()
    zero = torch.randint(0, 1 << bits, (5, groups), generator=g).to(torch.uint8)
    want = dequantize_codes(codes.to(torch.uint8), scale.float(), zero.float(), 32)
    assert torch.equal(dequantize_rows(packed, scale, zero, bits, 32, n), want)


@pytest.mark.parametrize("out,inp,group,k", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_reference_equals_dense_linear_of_dequantized_weight(out, inp, group, k, bits) -> None:
    layer = make_layer(out, inp, group, k, bits=bits, bias=True)
    keep = split_columns(inp, layer.outlier_idx)
    x = torch.randn(2, 3, inp)
    y = quant_linear_ref(x, layer.weight_packed, layer.weight_scale, layer.weight_zero_point, keep,
                         layer.outlier_idx, layer.outlier_weight, layer.bias, bits, group)
    want = F.linear(x.double(), layer.dequantize().double(), layer.bias.double())
    assert y.shape == (2, 3, out) and y.dtype == torch.float32
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-4)


def test_many_tiles_give_the_same_result(monkeypatch) -> None:
    layer = make_layer(160, 300, 128, 20, bias=True)
    keep = split_columns(300, layer.outlier_idx)
    x = torch.randn(4, 300)
    args = (layer.weight_packed, layer.weight_scale, layer.weight_zero_point, keep,
            layer.outlier_idx, layer.outlier_weight, layer.bias, 4, 128)
    one_tile = quant_linear_ref(x, *args)
    monkeypatch.setattr(qmatmul, "TILE_ELEMENTS", 16 * 280)  # 16 rows per tile: 10 tiles
    assert qmatmul.tile_rows(280) == 16
    assert torch.allclose(quant_linear_ref(x, *args), one_tile, rtol=1e-6, atol=1e-5)


def test_half_precision_input_is_computed_in_fp32_and_rounded_once() -> None:
    layer = make_layer(64, 128, 64, 2)
    keep = split_columns(128, layer.outlier_idx)
    x = torch.randn(3, 128).half()
    args = (layer.weight_packed, layer.weight_scale, layer.weight_zero_point, keep,
            layer.outlier_idx, layer.outlier_weight, None, 4, 64)
    y = quant_linear_ref(x, *args)
    assert y.dtype == torch.float16
    assert torch.equal(y, quant_linear_ref(x.float(), *args).half())
