"""Fused CPU siblings (q/k/v, gate/up) on both CPU kernels: bit-identical outputs, reuse only
for the same x."""
from __future__ import annotations

import copy

import pytest
import torch
from quant_layers import input_absmax, make_layer
from tiny_models import build, token_ids

from quantsink.weights import cpu_int4, cpu_w4
from quantsink.weights.backend import INT4PACK_MAX_ROWS, use_backend
from quantsink.weights.fusion import fuse_siblings
from quantsink.weights.outliers import split_columns
from quantsink.weights.runtime import prepare_model

PROBLEMS = {"cpu": cpu_w4.layer_problem(4, 32), "int4pack": cpu_int4.kernel_problem()}


@pytest.fixture(params=sorted(PROBLEMS), autouse=True)
def kind(request):
    """Every test runs under each CPU kernel (plans are built and called inside the context)."""
    if PROBLEMS[request.param] is not None:
        pytest.skip(PROBLEMS[request.param])
    with use_backend(request.param):
        yield request.param


def _siblings(bias: bool = True) -> torch.nn.Module:
    """q/k/v-like layers sharing outliers, plus one with other outliers (not fused)."""
    parent, shared = torch.nn.Module(), make_layer(16, 200, 32, 3).outlier_idx
    for i, out in enumerate((97, 48, 48)):
        layer = make_layer(out, 200, 32, 3, bias=bias and i != 1, seed=i)
        layer.outlier_idx.copy_(shared)  # the group's outlier channels
        setattr(parent, "qkv"[i], layer)
    parent.other = make_layer(64, 200, 32, 5, seed=9)
    for m in parent.children():
        m.prepare("cpu")
    return parent


@pytest.mark.parametrize("rows", [1, 5, cpu_w4.W4_MAX_ROWS + 1, INT4PACK_MAX_ROWS, INT4PACK_MAX_ROWS + 3])
def test_fused_members_are_bit_identical(rows: int, kind: str) -> None:
    fused = _siblings()
    plain = copy.deepcopy(fused)
    for m in plain.children():
        m.prepare("cpu")
    assert fuse_siblings(fused) == 3
    assert fused.q._plan.fused and not fused.other._plan.fused and fused.q.backend == kind
    assert fused.q._plan.int4 is None  # no converted copy of its own
    x = torch.randn(2, rows, 200)
    for name in ("q", "k", "v", "other"):
        assert torch.equal(getattr(fused, name)(x), getattr(plain, name)(x)), name


def test_reuse_only_for_the_same_unchanged_tensor() -> None:
    fused = _siblings()
    plain = copy.deepcopy(fused)
    for m in plain.children():
        m.prepare("cpu")
    fuse_siblings(fused)
    x, x2 = torch.randn(1, 200), torch.randn(1, 200)
    fused.q(x)
    assert torch.equal(fused.k(x2), plain.k(x2))  # another tensor: recomputed
    x.mul_(2)  # in place: same object, new version
    assert torch.equal(fused.v(x), plain.v(x))


def test_a_changed_member_leaves_the_group_alone() -> None:
    fused = _siblings()
    fuse_siblings(fused)
    x = torch.randn(3, 200)
    k_before = fused.k(x)
    fused.q.weight_scale.mul_(2)
    keep = split_columns(200, fused.q.outlier_idx)
    q = fused.q(x)
    assert not fused.q._plan.fused  # its own plan again
    assert torch.equal(fused.k(x), k_before)
    ref = torch.nn.functional.linear(x, fused.q.dequantize(), fused.q.bias)
    assert (q - ref).abs().max() < 0.02 * ref.abs().max() and keep.numel() == 197


def test_tiny_llama_fuses_qkv_and_gate_up_only() -> None:
    import quantsink

    model = build("llama")
    recipe = {"name": "t", "weights": {"algorithm": "rtn", "group_size": 32, "outlier_channels": 4,
                                       "outlier_score": "absmax"}}  # same input: same outliers
    quantsink.quantize(model, recipe, calibration=input_absmax(model, token_ids(32)), progress=False)
    assert prepare_model(model)["fused"] == 2 * 5  # q/k/v and gate/up, both layers; not o / down
    attn = model.model.layers[0].self_attn
    assert not attn.o_proj._plan.fused and attn.q_proj._plan.fused
    plain = copy.deepcopy(model)
    assert "fused" not in prepare_model(plain, fuse=False)
    assert not plain.model.layers[0].self_attn.q_proj._plan.fused  # unfused again
    ids = token_ids(12, batch=2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    no_outliers = build("llama")
    quantsink.quantize(no_outliers, {"name": "t", "weights": {"algorithm": "rtn", "group_size": 32,
                                                              "outlier_channels": 0}}, progress=False)
    assert "fused" not in prepare_model(no_outliers) or prepare_model(no_outliers)["fused"] == 0


def test_compiled_fused_member_matches_eager() -> None:
    fused = _siblings()
    fuse_siblings(fused)
    x = torch.randn(3, 200)
    want = fused.k(x)
    assert torch.equal(torch.compile(fused.k, backend="aot_eager", fullgraph=True)(x), want)
