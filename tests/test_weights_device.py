"""GPTQ, RTN and the scale search create every tensor on the weight's device.

CI has no GPU, so the weights and their calibration statistics go on a second device that
computes on the CPU (:mod:`device_check`): any op that mixes them with a CPU tensor raises, as
CUDA would (the old GPTQ made its scales, zeros and codes on the CPU and failed at the first
layer of ``--stream --device cuda``). The results equal the plain CPU run exactly.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from device_check import DeviceCheck, back, on_other_device
from quantsink.weights.config import WeightConfig
from quantsink.weights.layer import quantize_matrix, rtn_dequantized
from quantsink.weights.scale_search import search_scale
from quantsink.weights.groups import InputGroup


def _problem(seed: int = 0, out: int = 24, n: int = 80):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=gen)
    x = torch.randn(200, n, generator=gen) * torch.linspace(0.2, 3.0, n)
    return w, InputGroup(["a"], x.abs().amax(0), x.T @ x / 200, 200, mean_abs=x.abs().mean(0))


def _elsewhere(group: InputGroup) -> InputGroup:
    return dataclasses.replace(group, absmax=on_other_device(group.absmax),
                               hessian=on_other_device(group.hessian), mean_abs=on_other_device(group.mean_abs))


CONFIGS = {
    "gptq": WeightConfig(bits=4, group_size=32, algorithm="gptq", outlier_channels=4),
    "gptq-act-order": WeightConfig(bits=4, group_size=32, algorithm="gptq", outlier_channels=4, act_order=True),
    "gptq-sym-partial-group": WeightConfig(bits=4, group_size=64, algorithm="gptq", symmetric=True),
    "rtn": WeightConfig(bits=4, group_size=32, algorithm="rtn", outlier_channels=2),
    "rtn-8bit": WeightConfig(bits=8, group_size=64, algorithm="rtn"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_quantizers_stay_on_the_weights_device(name):
    cfg = CONFIGS[name]
    w, group = _problem()
    want = quantize_matrix(w, dataclasses.replace(group), cfg, [])
    with DeviceCheck():
        got = quantize_matrix(on_other_device(w), _elsewhere(group), cfg, [])
        codes, scale, zero, idx, rest = got  # on the weights' device; the outlier channel index on the CPU
        assert all(t.device.type == "meta" for t in (codes, scale, zero, rest)) and idx.device.type == "cpu"
    for a, b in zip(want, got):
        assert torch.equal(a, back(b))


def test_scale_search_stays_on_the_weights_device():
    cfg = CONFIGS["rtn"]
    w, group = _problem(1)

    def quantize(m, g):
        return rtn_dequantized(m, g, cfg, [])

    want = search_scale(w, group, quantize, grid=5)
    with DeviceCheck():
        got = search_scale(on_other_device(w), _elsewhere(group), quantize, grid=5)
    assert got.alpha == want.alpha and torch.equal(back(got.scale), want.scale)


def test_the_check_catches_a_cpu_tensor_mixed_in():
    """The mechanism itself: what the old GPTQ did (a CPU scale against a device column) raises."""
    from device_check import CrossDevice

    col = on_other_device(torch.randn(8))
    with DeviceCheck(), pytest.raises(CrossDevice):
        torch.round(col / torch.ones(8))
