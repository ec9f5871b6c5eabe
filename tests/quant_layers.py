"""Random packed layers for the weight-kernel tests, and the bf16 error bound they are held to."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from quantsink.weights.linear import QuantLinear
from quantsink.weights.outliers import split_columns
from quantsink.weights.qmatmul import unpack_rows
from quantsink.weights.rtn import rtn_quantize

BF16_U = 2.0 ** -8  # unit roundoff of bf16 (8-bit significand, round to nearest)

# (out, in, group, outliers): aligned, odd out (N padding), partial last group (K padding),
# 0 / 1 / many outliers, groups of 32..128
SHAPES = [(64, 128, 64, 0), (97, 200, 32, 3), (48, 136, 64, 1), (33, 70, 32, 0),
          (160, 300, 128, 20), (16, 64, 32, 16)]


def make_layer(out: int, inp: int, group: int, k: int, bits: int = 4, bias: bool = False,
               seed: int = 0, symmetric: bool = False) -> QuantLinear:
    """A QuantLinear from a random weight (heavy-tailed columns), RTN, ``k`` outlier channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * (0.2 + torch.rand(1, inp, generator=g) ** 3)
    idx = torch.sort(torch.randperm(inp, generator=g)[:k]).values
    keep = split_columns(inp, idx)
    codes, s, z = rtn_quantize(w[:, keep], bits, group, symmetric, clip_search=False)
    b = torch.randn(out, generator=g) if bias else None
    return QuantLinear.from_quantized(codes, s, z, idx, w[:, idx] * 4, bits, group, b)


def bf16_bound(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """Elementwise first-order bound of the bf16 int4 paths against the fp32 reference.

    x and each weight term are rounded to bf16 once (relative ``u`` each): the weight enters as
    ``(c - 8) * bf16(s) + bf16((8 - zp) * s)`` (kernel) or ``bf16((c - zp) * s)`` (tiled), both
    within ``u * (|c - 8| + |8 - zp|) * s`` of the exact value; accumulation is fp32 and the
    quantized part of the output is rounded to bf16 once (``u * |x_q| @ |W_q|.T``). The fp32
    outlier columns add nothing; second-order and fp32 accumulation terms are in the 1 %.
    Returns ``[..., out]`` like the layer's output.
    """
    n_q = layer.in_features - layer.n_outliers
    keep = split_columns(layer.in_features, layer.outlier_idx)
    c = unpack_rows(layer.weight_packed, 4)[:, :n_q].float()  # [out, n_q]
    s = layer.weight_scale.float().repeat_interleave(layer.group_size, 1)[:, :n_q]
    zp = layer.weight_zero_point.float().repeat_interleave(layer.group_size, 1)[:, :n_q]
    xa = x.reshape(-1, layer.in_features)[:, keep].abs().double()
    w_abs = ((c - zp) * s).abs().double()
    terms = ((c - 8).abs() + (8 - zp).abs()).double() * s.double()
    b = BF16_U * (2 * xa @ w_abs.T + xa @ terms.T)
    return (1.01 * b + 1e-6).float().reshape(*x.shape[:-1], layer.out_features)


def input_absmax(model, ids: torch.Tensor) -> SimpleNamespace:
    """A stand-in calibration result: every Linear's input absmax on ``ids`` (for RTN recipes)."""
    stats, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, args, name=name):
                stats[f"act_absmax/{name}"] = args[0].detach().abs().reshape(-1, m.in_features).amax(0)
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return SimpleNamespace(stats=stats, massive=[], sink_map=None)
