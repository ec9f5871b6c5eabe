"""GPTQ, outlier selection and QuantLinear on synthetic layers."""
from __future__ import annotations

import math

import pytest
import torch

from quantsink.weights.backend import use_backend
from quantsink.weights.gptq import gptq_quantize
from quantsink.weights.linear import QuantLinear
from quantsink.weights.outliers import channel_scores, select_outliers, split_columns
from quantsink.weights.rtn import dequantize_codes, rtn_quantize


def correlated_inputs(n: int, tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / math.sqrt(n) + 0.3 * torch.eye(n)
    return torch.randn(tokens, n, generator=g) @ mix  # [tokens, n], strongly correlated


def output_mse(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x @ (w - wq).T).pow(2).mean())


@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(group: int, act_order: bool) -> None:
    n = 320  # not a multiple of 128: partial last group
    x = correlated_inputs(n)
    w = torch.randn(96, n, generator=torch.Generator().manual_seed(1)) * 0.05
    h = x.T @ x / x.shape[0]
    rtn = dequantize_codes(*rtn_quantize(w, 4, group, False), group)
    codes, scale, zero, rest = gptq_quantize(w, h, n, 4, group, False, act_order=act_order)
    assert rest.shape == (96, 0) and codes.shape == (96, n)
    gptq = dequantize_codes(codes, scale, zero, group)
    assert output_mse(x, w, gptq) < 0.6 * output_mse(x, w, rtn)


def test_gptq_is_deterministic_and_tail_absorbs_error() -> None:
    n = 256
    x = correlated_inputs(n, seed=3)
    w = torch.randn(64, n, generator=torch.Generator().manual_seed(4)) * 0.05
    h = x.T @ x / x.shape[0]
    a = gptq_quantize(w, h, n - 16, 4, 64, False)
    b = gptq_quantize(w, h, n - 16, 4, 64, False)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    codes, scale, zero, rest = a
    with_tail = torch.cat([dequantize_codes(codes, scale, zero, 64), rest], 1)
    frozen_tail = torch.cat([dequantize_codes(codes, scale, zero, 64), w[:, n - 16:]], 1)
    assert output_mse(x, w, with_tail) < output_mse(x, w, frozen_tail)


def test_outlier_selection_prefers_forced_then_score() -> None:
    absmax = torch.ones(64)
    absmax[[5, 40]] = 100.0
    w = torch.ones(8, 64)
    w[:, 7] = 50.0  # large column norm: score 50 beats plain channels
    scores = channel_scores(absmax, w)
    idx = select_outliers(scores, 4, forced=[63])
    assert idx.tolist() == [5, 7, 40, 63]
    assert select_outliers(channel_scores(absmax, w, "absmax"), 2).tolist() == [5, 40]
    assert select_outliers(scores, 0).numel() == 0
    assert split_columns(6, torch.tensor([1, 4])).tolist() == [0, 2, 3, 5]


@pytest.mark.parametrize("bits,in_f,k,bias", [(4, 576, 32, False), (4, 200, 0, True), (8, 130, 7, False)])
def test_quant_linear_matches_dequantized_matmul(bits: int, in_f: int, k: int, bias: bool) -> None:
    torch.manual_seed(5)
    w = torch.randn(48, in_f)
    idx = select_outliers(torch.rand(in_f), k)
    keep = split_columns(in_f, idx)
    codes, scale, zero = rtn_quantize(w[:, keep], bits, 64, False)
    b = torch.randn(48) if bias else None
    layer = QuantLinear.from_quantized(codes, scale, zero, idx, w[:, idx], bits, 64, b)
    ref = torch.empty_like(w)
    ref[:, keep] = dequantize_codes(codes, scale.half().float(), zero, 64)
    ref[:, idx] = w[:, idx].half().float()
    x = torch.randn(3, 5, in_f)
    expected = x @ ref.T + (0 if b is None else b)
    with use_backend("reference"):  # the float32 reference is exact up to fp32 summation
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=5e-5)
    # the host's kernel (bf16 int4pack on AVX512 CPUs): within bf16 rounding of the products
    tol = 2.0 ** -7 * (x.abs() @ ref.abs().T) + 1e-5
    assert ((layer(x) - expected).abs() <= tol).all()
    assert layer.weight_packed.dtype == torch.int32 and layer.weight_shape.tolist() == [48, in_f]
    # int4 codes + fp16 grids cost well under fp16 when there are no outliers
    if bits == 4 and k == 0:
        assert layer.packed_nbytes() < 0.32 * 2 * w.numel()
