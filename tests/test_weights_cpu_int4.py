"""The CPU int4pack path against its spec: exact conversion, the kernel's bf16 model, the bound."""
from __future__ import annotations

import pytest
import torch
from quant_layers import SHAPES, bf16_bound, make_layer

from quantsink.weights import cpu_int4
from quantsink.weights.backend import INT4PACK_MAX_ROWS, use_backend
from quantsink.weights.cpu_int4 import convert, int4pack_linear_cpu
from quantsink.weights.outliers import split_columns
from quantsink.weights.qmatmul import quant_linear_ref, unpack_rows

# torch's int4pack kernel needs fast bf16: only the tests that run it skip without (by name)
needs_bf16 = pytest.mark.skipif(cpu_int4.kernel_problem() is not None,
                                reason=f"int4pack (bf16) case: {cpu_int4.kernel_problem()}")


def _convert(layer):
    keep = split_columns(layer.in_features, layer.outlier_idx)
    return keep, convert(layer.weight_packed, layer.weight_scale, layer.weight_zero_point, keep,
                         layer.outlier_idx, layer.outlier_weight, layer.group_size, layer.in_features)


def _run(layer, p, x):
    return int4pack_linear_cpu(x, p.packed, p.scales_zeros, p.gather_idx, p.outlier_idx,
                               p.outlier_weight_t, layer.bias, layer.group_size,
                               layer.out_features, p.pad)


def _ref(layer, keep, x, compute_dtype=None):
    return quant_linear_ref(x, layer.weight_packed, layer.weight_scale, layer.weight_zero_point,
                            keep, layer.outlier_idx, layer.outlier_weight, layer.bias, 4,
                            layer.group_size, compute_dtype)


@pytest.mark.parametrize("out,inp,group,k", SHAPES)
def test_converted_grid_is_exact_and_padding_is_inert(out, inp, group, k) -> None:
    layer = make_layer(out, inp, group, k)
    _, p = _convert(layer)
    n_q, n_pad = inp - k, -(-out // 16) * 16
    assert p.scales_zeros.shape == (-(-n_q // group), n_pad, 2)
    assert p.packed.shape == (n_pad, -(-n_q // group) * group // 2)
    sz = p.scales_zeros.float()
    assert torch.equal(sz[:, :out, 0], layer.weight_scale.float().T.bfloat16().float())
    want_z = ((8 - layer.weight_zero_point.float()) * layer.weight_scale.float()).T
    assert torch.equal(sz[:, :out, 1], want_z.bfloat16().float())
    assert not sz[:, out:].any()  # padded outputs: zero scale and zero
    assert p.pad == -(-n_q // group) * group - n_q


@needs_bf16
@pytest.mark.parametrize("out,inp,group,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, INT4PACK_MAX_ROWS])
def test_kernel_matches_its_bf16_model(out, inp, group, k, rows) -> None:
    """Up to accumulation order, y = bf16(bf16(x_q) @ ((c-8)*bf16(s) + bf16(z)).T) + fp32 outliers."""
    layer = make_layer(out, inp, group, k, bias=True, seed=rows)
    keep, p = _convert(layer)
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(1))
    n_q = inp - k
    c = unpack_rows(layer.weight_packed, 4)[:, :n_q].float()
    sz = p.scales_zeros.float()[:, :out].repeat_interleave(group, 0)[:n_q]  # [n_q, out, 2]
    w = (c - 8) * sz[..., 0].T + sz[..., 1].T  # [out, n_q]
    yq = (x[:, keep].bfloat16().double() @ w.double().T).bfloat16().float()
    want = yq + x[:, layer.outlier_idx] @ layer.outlier_weight.float().T + layer.bias
    got = _run(layer, p, x)
    ulp = yq.abs().clamp_min(2.0 ** -100) * 2.0 ** -7  # one bf16 ulp (or less) of the int4 part
    assert ((got - want).abs() <= ulp + 1e-5).all()


@needs_bf16
@pytest.mark.parametrize("out,inp,group,k", SHAPES)
def test_within_bf16_bound_of_fp32_reference(out, inp, group, k) -> None:
    layer = make_layer(out, inp, group, k, bias=True)
    keep, p = _convert(layer)
    x = torch.randn(5, inp, generator=torch.Generator().manual_seed(2)) * 3
    ref = _ref(layer, keep, x)
    bound = bf16_bound(layer, x)
    assert ((_run(layer, p, x) - ref).abs() <= bound).all()
    assert ((_ref(layer, keep, x, torch.bfloat16) - ref).abs() <= bound).all()  # many-row path
    # the bound is tight enough to catch a wrong zero point (off by one code)
    layer.weight_zero_point.add_(1)
    _, bad = _convert(layer)
    layer.weight_zero_point.sub_(1)
    assert not ((_run(layer, bad, x) - ref).abs() <= bound).all()


@needs_bf16
def test_module_uses_the_kernel_then_the_tiled_path() -> None:
    layer = make_layer(97, 200, 32, 3, bias=True)
    keep = split_columns(200, layer.outlier_idx)
    for rows in (1, INT4PACK_MAX_ROWS, INT4PACK_MAX_ROWS + 1):
        x = torch.randn(rows, 200)
        with use_backend("int4pack"):
            y = layer(x)
            assert layer.kernel == "int4pack"
        with use_backend("reference"):
            assert torch.equal(layer(x), _ref(layer, keep, x))
        assert ((y - _ref(layer, keep, x)).abs() <= bf16_bound(layer, x)).all()


def test_bf16_and_3d_inputs_keep_their_dtype_and_shape() -> None:
    layer = make_layer(64, 128, 64, 2)
    x = torch.randn(2, 3, 128)
    y = layer(x)
    assert y.shape == (2, 3, 64) and y.dtype == torch.float32
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@needs_bf16
@pytest.mark.parametrize("out,inp,group,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_call_matches_its_torch_spec(out, inp, group, k, dtype) -> None:
    """The extension's one call equals the torch ops up to the fp32 outlier sum's order."""
    from quantsink.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.skip("the C++ CPU extension does not build here")
    assert cpu_int4._extension() is not None  # the default call takes the C++ path
    layer = make_layer(out, inp, group, k, bias=True, seed=k)
    _, p = _convert(layer)
    for rows in (1, 5, INT4PACK_MAX_ROWS):
        x = (torch.randn(2, rows, inp, generator=torch.Generator().manual_seed(rows)) * 4).to(dtype)
        args = (p.packed, p.scales_zeros, p.gather_idx, p.outlier_idx, p.outlier_weight_t, layer.bias,
                layer.group_size, layer.out_features, p.pad)
        got, want = int4pack_linear_cpu(x, *args), cpu_int4.int4pack_linear_torch(x, *args)
        assert got.shape == want.shape == (2, rows, out) and got.dtype == want.dtype == dtype
        xo = x.float()[..., layer.outlier_idx].abs() @ layer.outlier_weight.float().abs().T
        ulp = 2.0 ** -7 * want.float().abs() if dtype == torch.bfloat16 else 0.0  # one output rounding
        assert ((got.float() - want.float()).abs() <= 1e-5 * xo + ulp + 1e-6).all()
        if not k:  # no outlier sum: the same ops in the same order
            assert torch.equal(got, want)
