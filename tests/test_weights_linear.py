"""QuantLinear: kernel selection once per device, no dense copy, plan invalidation, torch.compile."""
from __future__ import annotations

import pytest
import torch
from quant_layers import bf16_bound, make_layer

from quantsink.errors import QuantsinkError
from quantsink.weights import backend, cpu_int4, cpu_w4
from quantsink.weights.backend import use_backend
from quantsink.weights.linear import QuantLinear

HAS_INT4PACK = cpu_int4.kernel_problem() is None


def _tensors(obj) -> list[torch.Tensor]:
    return [v for v in vars(obj).values() if isinstance(v, torch.Tensor)]


def test_no_dense_copy_is_ever_kept() -> None:
    layer = make_layer(97, 200, 32, 3)
    assert not hasattr(QuantLinear, "cache_dequantized")
    for name in ("auto", "reference"):
        with use_backend(name):
            layer(torch.randn(100, 200))  # the many-row path too
        plan = layer._plan
        held = _tensors(plan) + (_tensors(plan.int4) if plan.int4 is not None else [])
        nbytes = sum(t.numel() * t.element_size() for t in held)
        assert nbytes < 97 * 200, [tuple(t.shape) for t in held]  # dense bf16 would be 2 B/weight


def test_kernel_is_chosen_once_and_rebuilt_only_when_buffers_change() -> None:
    layer = make_layer(64, 128, 64, 2)
    x = torch.randn(1, 128)
    y0 = layer(x)
    plan = layer._plan
    layer(x)
    assert layer._plan is plan  # not re-chosen per call
    layer.weight_scale.mul_(2)  # in place: the converted tensors are stale
    y1 = layer(x)
    assert layer._plan is not plan
    with use_backend("reference"):
        want = layer(x)
    assert ((y1 - want).abs() <= bf16_bound(layer, x)).all()
    assert not torch.allclose(y0, y1)


def test_eight_bit_uses_the_reference_and_every_even_group_a_kernel() -> None:
    layer8 = make_layer(33, 70, 32, 1, bits=8)
    layer16 = make_layer(33, 70, 16, 1)
    assert layer8.prepare() == "reference" and layer8.kernel == "reference"
    want16 = "cpu" if cpu_w4.layer_problem(4, 16) is None else "reference"
    assert layer16.prepare() == want16
    for layer in (layer8, layer16):
        x = torch.randn(2, 70)
        assert torch.allclose(layer(x), x @ layer.dequantize().T, rtol=1e-5, atol=1e-5)


def test_reference_path_on_the_cpu_is_said_once_per_reason(monkeypatch, caplog) -> None:
    monkeypatch.setattr(backend, "_WARNED", set())
    with caplog.at_level("WARNING", logger="quantsink"):
        for _ in range(3):
            make_layer(33, 70, 32, 1, bits=8).prepare("cpu")
        make_layer(33, 70, 15, 1).prepare("cpu")
    lines = [r.getMessage() for r in caplog.records if "torch reference path" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "8-bit weights" in lines[0] and "group_size 15" in lines[1]
    assert all("\n" not in line for line in lines)


@pytest.mark.skipif(not HAS_INT4PACK, reason="int4pack kernel unavailable on this host")
def test_auto_picks_the_cpu_kernel_then_int4pack(monkeypatch) -> None:
    want = "cpu" if cpu_w4.layer_problem(4, 64) is None else "int4pack"
    assert make_layer(64, 128, 64, 0).prepare("cpu") == want
    monkeypatch.setattr(cpu_w4, "_host_problem", lambda: "no compiler")  # no extension
    assert make_layer(64, 128, 64, 0).prepare("cpu") == "int4pack"


def test_hosts_without_fast_bf16_fall_back_to_the_reference(monkeypatch) -> None:
    monkeypatch.setattr(cpu_int4, "kernel_problem", lambda: "this CPU has no fast bf16")
    monkeypatch.setattr(cpu_w4, "_host_problem", lambda: "no compiler")
    layer = make_layer(64, 128, 64, 2)
    assert layer.prepare("cpu") == "reference"
    with pytest.raises(QuantsinkError, match="no fast bf16"):
        with use_backend("int4pack"):
            layer.prepare("cpu")


def test_forcing_a_backend_that_cannot_run_is_one_line(monkeypatch) -> None:
    layer = make_layer(64, 128, 64, 0, bits=8)
    monkeypatch.setenv(backend.ENV, "int4pack")
    with pytest.raises(QuantsinkError, match="cannot run .*8-bit") as exc:
        layer(torch.randn(1, 128))
    assert "\n" not in str(exc.value)
    monkeypatch.setenv(backend.ENV, "triton")
    with pytest.raises(QuantsinkError, match="runs on CUDA, not cpu"):
        make_layer(64, 128, 64, 0)(torch.randn(1, 128))
    monkeypatch.setenv(backend.ENV, "fast")
    with pytest.raises(QuantsinkError, match="not supported; allowed"):
        layer(torch.randn(1, 128))
    with pytest.raises(QuantsinkError, match="not supported; allowed"):
        with use_backend("gpu"):
            pass


def test_a_deep_copy_gets_its_own_plan() -> None:
    import copy

    layer = make_layer(64, 128, 64, 2, bias=True)
    x = torch.randn(1, 128)
    y = layer(x)
    twin = copy.deepcopy(layer)
    assert twin._plan is None
    layer.bias.data.add_(1.0)  # the original changes; the copy must not
    assert torch.equal(twin(x), y)


def test_state_dict_round_trip_rebuilds_the_plan() -> None:
    a, b = make_layer(48, 136, 64, 1, seed=1), make_layer(48, 136, 64, 1, seed=2)
    x = torch.randn(2, 136)
    yb = b(x)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(x), a(x)) and not torch.equal(b(x), yb)


@pytest.mark.parametrize("prepared", [True, False])
def test_torch_compile_traces_the_ops(prepared: bool) -> None:
    layer = make_layer(97, 200, 32, 3, bias=True)
    x_small, x_big = torch.randn(3, 200), torch.randn(80, 200)
    want = (layer(x_small), layer(x_big))
    if not prepared:
        layer._plan = None  # compiled before any eager call: a graph break prepares it
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=prepared)
    assert torch.equal(compiled(x_small), want[0])
    assert torch.equal(compiled(x_big), want[1])
