"""The CPU W4A32 kernel (stored buffers, no copy) against the float32 torch reference."""
from __future__ import annotations

import pytest
import torch
from cpu_levels import LEVELS
from quant_layers import SHAPES, make_layer

from quantsink.kernels import cpu_ext
from quantsink.weights import cpu_w4
from quantsink.weights.backend import use_backend
from quantsink.weights.outliers import split_columns
from quantsink.weights.qmatmul import quant_linear_ref

# no module-wide skip: each test runs per ISA level (cpu_levels), or needs the extension only
needs_extension = pytest.mark.skipif(cpu_w4.layer_problem(4, 32) is not None,
                                     reason=f"the W4A32 module path: {cpu_w4.layer_problem(4, 32)}")


def _ref(layer, x):
    keep = split_columns(layer.in_features, layer.outlier_idx)
    return quant_linear_ref(x, layer.weight_packed, layer.weight_scale, layer.weight_zero_point, keep,
                            layer.outlier_idx, layer.outlier_weight, layer.bias, 4, layer.group_size)


def _bound(layer, x):
    """fp32 rounding of a length-``in`` dot product: 2^-20 of sum |x| |w|, plus a floor."""
    return 2.0 ** -20 * (x.float().abs() @ layer.dequantize().abs().T + (layer.bias.abs() if
                                                                         layer.bias is not None else 0)) + 1e-6


def _run(layer, x, isa=None):
    n_q = layer.in_features - layer.n_outliers
    return cpu_w4.w4_linear_cpu(x, cpu_w4.gather_index(layer), n_q, layer.group_size,
                                cpu_w4.layer_tensors([layer]), isa=isa)[0]


@pytest.mark.parametrize("out,inp,group,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("isa", LEVELS)
def test_matches_fp32_reference(out, inp, group, k, rows, isa) -> None:
    """Every row block (4, 3, 2, 1 rows), partial last groups, odd widths, outliers, bias."""
    layer = make_layer(out, inp, group, k, bias=True, seed=rows)
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows)) * 3
    got, ref = _run(layer, x, isa), _ref(layer, x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert ((got - ref).abs() <= _bound(layer, x)).all()
    layer.weight_zero_point.add_(1)  # the bound catches a zero point off by one code
    assert not ((_run(layer, x, isa) - ref).abs() <= _bound(layer, x)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", LEVELS)
def test_other_dtypes_and_3d_inputs(dtype, isa) -> None:
    layer = make_layer(97, 200, 32, 3, bias=True)
    x = torch.randn(2, 3, 200).to(dtype)
    got, ref = _run(layer, x, isa), _ref(layer, x.float())
    assert got.shape == (2, 3, 97) and got.dtype == dtype
    assert ((got.float() - ref).abs() <= 2.0 ** -7 * ref.abs() + _bound(layer, x)).all()  # one output rounding


@pytest.mark.parametrize("group", [16, 48])
@pytest.mark.parametrize("isa", LEVELS)
def test_other_group_sizes(group, isa) -> None:
    """Groups that are not a multiple of two vectors take the scalar loop; all take a kernel."""
    layer = make_layer(40, 150, group, 2, bias=True)
    x = torch.randn(3, 150)
    assert ((_run(layer, x, isa) - _ref(layer, x)).abs() <= _bound(layer, x)).all()
    assert cpu_w4.layer_problem(4, group) is None
    assert cpu_w4.layer_problem(4, 15) is not None  # odd: no kernel


@needs_extension
def test_module_picks_it_and_prefill_takes_the_tiles() -> None:
    layer = make_layer(97, 200, 32, 3, bias=True)
    for rows in (1, cpu_w4.W4_MAX_ROWS, cpu_w4.W4_MAX_ROWS + 1):
        x = torch.randn(rows, 200)
        y = layer(x)
        assert layer.backend == "cpu" and layer.kernel == cpu_w4.kernel_name(32)
        assert layer.kernel.startswith("cpu-w4a32[") and cpu_ext.selected_level() in layer.kernel
        with use_backend("reference"):
            assert torch.equal(layer(x), _ref(layer, x))
        if rows <= cpu_w4.W4_MAX_ROWS:
            assert ((y - _ref(layer, x)).abs() <= _bound(layer, x)).all()
        else:  # bf16 tiles: within the bf16 bound, not the fp32 one
            assert not torch.equal(y, _run(layer, x))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 200)
    assert ((compiled(x) - _ref(layer, x)).abs() <= _bound(layer, x)).all()


@needs_extension
@pytest.mark.parametrize("fast_bf16", [True, False])
def test_prefill_tiles_are_float32_without_fast_bf16(monkeypatch, fast_bf16) -> None:
    """A host without bf16 hardware (AVX2-only) computes the many-rows tiles in float32: within
    the fp32 bound of the reference; a bf16 host's tiles are not."""
    from quantsink.weights import backend

    monkeypatch.setattr(backend, "kernel_problem", lambda: None if fast_bf16 else "no fast bf16")
    layer = make_layer(97, 200, 32, 3, bias=True, seed=4)
    x = torch.randn(cpu_w4.W4_MAX_ROWS + 7, 200, generator=torch.Generator().manual_seed(5))
    assert backend.tile_dtype() == (torch.bfloat16 if fast_bf16 else torch.float32)
    within = bool(((layer(x) - _ref(layer, x)).abs() <= _bound(layer, x) * 64).all())
    assert within != fast_bf16
