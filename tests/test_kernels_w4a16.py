"""The Triton W4A16 kernel against the torch reference, under the interpreter on CPU (fp32/fp16)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from quant_layers import make_layer

from quantsink.errors import QuantsinkError
from quantsink.weights.outliers import split_columns
from quantsink.weights.qmatmul import quant_linear_ref

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or
    (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton (with TRITON_INTERPRET=1 on CPU)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # (out, in, group, outliers, rows, bias, splits)
    (97, 200, 32, 3, 1, True, 1),  # odd N, partial last group, GEMV
    (64, 128, 64, 0, 5, False, 2),  # aligned, no outliers, split-K
    (33, 70, 16, 1, 17, True, 3),  # two row blocks of 16, uneven splits
    (48, 300, 128, 20, 40, False, 1),  # many outliers, BLOCK_M 64
]


def _args(layer):
    keep = split_columns(layer.in_features, layer.outlier_idx)
    return (layer.weight_packed.to(DEVICE), layer.weight_scale.to(DEVICE),
            layer.weight_zero_point.to(DEVICE), keep.to(DEVICE), layer.outlier_idx.to(DEVICE),
            layer.outlier_weight.to(DEVICE), None if layer.bias is None else layer.bias.to(DEVICE))


@pytest.mark.parametrize("out,inp,group,k,rows,bias,splits", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference(out, inp, group, k, rows, bias, splits, dtype) -> None:
    from quantsink.kernels.w4a16 import w4a16_linear

    layer = make_layer(out, inp, group, k, bias=bias, seed=rows)
    args = _args(layer)
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    ref = quant_linear_ref(x.float(), *args, 4, group)  # fp32 on the same (rounded) x
    y = w4a16_linear(x, *args, group, num_splits=splits)
    assert y.dtype == dtype and y.shape == (rows, out)
    if dtype == torch.float32:
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4)
    else:  # fp32 accumulation, one fp16 rounding of the output
        assert ((y.float() - ref).abs() <= ref.abs() * 2.0 ** -10 + 1e-3).all()


def test_leading_dims_and_noncontiguous_rows() -> None:
    from quantsink.kernels.w4a16 import w4a16_linear

    layer = make_layer(64, 128, 64, 2)
    args = _args(layer)
    x = torch.randn(2, 3, 256, device=DEVICE)[..., ::2]  # stride 2 along the channels
    y = w4a16_linear(x, *args, 64)
    assert y.shape == (2, 3, 64)
    assert torch.allclose(y, quant_linear_ref(x, *args, 4, 64), rtol=1e-5, atol=1e-4)


def test_contract_violations_are_one_line() -> None:
    from quantsink.kernels.w4a16 import w4a16_linear

    layer = make_layer(64, 128, 64, 2)
    args = _args(layer)
    x = torch.randn(1, 128, device=DEVICE)
    with pytest.raises(QuantsinkError, match="group_size 48"):
        w4a16_linear(x, *args, 48)
    with pytest.raises(QuantsinkError, match="weight_scale and weight_zero_point must be"):
        w4a16_linear(x, args[0], args[1][:, :1], *args[2:], 64)
    with pytest.raises(QuantsinkError, match="x dtype torch.int64"):
        w4a16_linear(x.long(), *args, 64)
    if DEVICE == "cpu":
        with pytest.raises(QuantsinkError, match="bf16 does not run under TRITON_INTERPRET"):
            w4a16_linear(x.bfloat16(), *args, 64)


def test_the_op_dispatches_to_the_reference_off_cuda() -> None:
    from quantsink.weights.ops import ops

    layer = make_layer(97, 200, 32, 3, bias=True)
    args = _args(layer)
    x = torch.randn(4, 200, device=DEVICE)
    y = ops().quant_linear(x, *args, 4, 32)
    if DEVICE == "cpu":
        assert torch.equal(y, quant_linear_ref(x, *args, 4, 32))
