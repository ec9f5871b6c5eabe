"""One int4pack call for sibling layers that read the same input (q/k/v, gate/up) at decode.

On the CPU a decode step spends about as long around the kernel (gather, bf16 conversion,
outlier product: one op each) as inside it, so :func:`fuse_siblings` (run by
``prepare_model``) merges, per parent module, the ``int4pack`` layers with the same input
width, group size and outlier channels (quantization picks the outliers per input group,
so q/k/v and gate/up share them, and o_proj / down_proj get sets of their own; layers without
outlier channels are never fused): their codes, grids and outlier columns are concatenated
along the output dimension and converted once; the members' own converted tensors are
dropped, nothing is held twice.

At decode (up to ``INT4PACK_MAX_ROWS`` rows) the first member called with ``x`` computes
every member's output in one call and keeps it with ``x``; a member called with the same
tensor (same object, same version) returns its column slice; any other input recomputes.
Each output column is the same function as unfused, bit for bit (the kernel's columns and
the outlier product's are independent). Many rows (prefill) take the member's own tiled
path. A member whose buffers change rebuilds a plan of its own (its siblings are unaffected).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantsink.weights import backend
from quantsink.weights.cpu_int4 import convert, int4pack_linear_cpu


class FusedInt4:
    """The merged int4pack tensors of sibling layers, and the last input's full output."""

    def __init__(self, members: list[Any]) -> None:
        first = members[0]
        cat = lambda name: torch.cat([getattr(m, name) for m in members])  # noqa: E731
        self.pack = convert(cat("weight_packed"), cat("weight_scale"), cat("weight_zero_point"),
                            _keep(first), first.outlier_idx, cat("outlier_weight"),
                            first.group_size, first.in_features)
        has_bias = any(m.bias is not None for m in members)
        self.bias = torch.cat([m.bias.detach() if m.bias is not None else
                               torch.zeros(m.out_features) for m in members]) if has_bias else None
        self.group_size, self.n = first.group_size, sum(m.out_features for m in members)
        self._last: tuple | None = None  # (x, x._version, y [..., n])

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n]``: every member's output for ``x`` (reused for the same tensor)."""
        last = self._last
        if last is None or last[0] is not x or last[1] != x._version:
            p = self.pack
            y = int4pack_linear_cpu(x, p.packed, p.scales_zeros, p.gather_idx, p.outlier_idx,
                                    p.outlier_weight_t, self.bias, self.group_size, self.n, p.pad)
            last = self._last = (x, x._version, y)
        return last[2]


def _keep(m: Any) -> torch.Tensor:
    from quantsink.weights.outliers import split_columns

    return split_columns(m.in_features, m.outlier_idx.cpu())


def _key(m: Any) -> tuple | None:
    """Layers with equal keys read the same input; None: unknown (no outlier channels)."""
    if not m.n_outliers:
        return None  # o_proj would look like q/k/v: fusing it would only repeat work
    return (m.in_features, m.group_size, tuple(m.outlier_idx.tolist()))


def _member_plan(fused: FusedInt4, m: Any, lo: int) -> backend.Plan:
    """``m``'s plan, reading the fused output (no converted tensors of its own)."""
    from quantsink.weights.ops import ops
    from quantsink.weights.qmatmul import quant_linear_ref

    ops()  # the torch.ops.quantsink ops used by ``traced``
    hi = lo + m.out_features
    args = (m.weight_packed, m.weight_scale, m.weight_zero_point, _keep(m), m.outlier_idx,
            m.outlier_weight, m.bias, m.bits, m.group_size, torch.bfloat16)  # many rows: tiles

    def eager(x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= backend.INT4PACK_MAX_ROWS * x.shape[-1]:
            return fused.outputs(x)[..., lo:hi]
        return quant_linear_ref(x, *args)

    def traced(x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= backend.INT4PACK_MAX_ROWS * x.shape[-1]:
            p = fused.pack
            y = torch.ops.quantsink.int4pack_linear(
                x, p.packed, p.scales_zeros, p.gather_idx, p.outlier_idx, p.outlier_weight_t,
                fused.bias, fused.group_size, fused.n, p.pad)
            return y[..., lo:hi]
        return torch.ops.quantsink.quant_linear(x, *args)

    return backend.bound_plan(m, torch.device("cpu"), "int4pack", eager, traced)


def _candidate(m: Any) -> bool:
    from quantsink.weights.linear import QuantLinear

    return (isinstance(m, QuantLinear) and _key(m) is not None
            and backend.choose(m, m.weight_packed.device) == "int4pack")


def fuse_siblings(model: nn.Module, after_each: Any = None) -> int:
    """Fuse the int4pack siblings of every module of ``model`` (their plans are replaced, no
    converted tensors of their own are made); returns the number of layers fused.

    ``after_each()`` runs after each fused group (``prepare_model`` frees memory there).
    """
    if backend.requested_backend() not in ("auto", "int4pack"):
        return 0
    fused_layers = 0
    for parent in model.modules():
        groups: dict[tuple, list] = {}
        for child in parent.children():
            if _candidate(child):
                groups.setdefault(_key(child), []).append(child)
        for members in (g for g in groups.values() if len(g) > 1):
            fused, lo = FusedInt4(members), 0
            for m in members:
                m._plan = _member_plan(fused, m, lo)
                lo += m.out_features
            fused_layers += len(members)
            if after_each is not None:
                after_each()
    return fused_layers
