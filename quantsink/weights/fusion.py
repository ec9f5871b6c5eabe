"""One CPU kernel call for sibling layers that read the same input (q/k/v, gate/up) at decode.

On the CPU a decode step spends about as long around a kernel call (gather, conversion,
outlier product) as inside it, so :func:`fuse_siblings` (run by ``prepare_model``) groups,
per parent module, the ``cpu`` or ``int4pack`` layers with the same input width, group size
and outlier channels (quantization picks the outliers per input group, so q/k/v and gate/up
share them, and o_proj / down_proj get sets of their own; layers without outlier channels
are never fused):

- ``cpu`` (:mod:`quantsink.weights.cpu_w4`): one call takes every member's stored buffers as
  a list and gathers ``x`` once; nothing is copied;
- ``int4pack``: the members' codes, grids and outlier columns are concatenated along the
  output dimension and converted once (the members hold no converted tensors of their own).

At decode the first member called with ``x`` computes every member's output in one call and
keeps it with ``x``; a member called with the same tensor (same object, same version)
returns its part; any other input recomputes. Each output is the same function as unfused,
bit for bit (output columns are independent). Many rows (prefill) take the member's own
tiled path. A member whose buffers change rebuilds a plan of its own (its siblings are
unaffected).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantsink.weights import backend
from quantsink.weights.cpu_int4 import convert, int4pack_linear_cpu


class _Shared:
    """The last input of a sibling group and every member's output for it."""

    _last: tuple | None = None  # (x, x._version, outputs)

    def outputs(self, x: torch.Tensor) -> Any:
        last = self._last
        if last is None or last[0] is not x or last[1] != x._version:
            last = self._last = (x, x._version, self.compute(x))
        return last[2]

    def compute(self, x: torch.Tensor) -> Any:
        raise NotImplementedError


class FusedW4(_Shared):
    """Sibling ``cpu`` layers: one W4A32 call over their stored buffers (a list per member)."""

    def __init__(self, members: list[Any]) -> None:
        from quantsink.weights.cpu_w4 import gather_index, layer_tensors

        first = members[0]
        self.gather, self.n_q = gather_index(first), first.in_features - first.n_outliers
        self.group_size, self.tensors = first.group_size, layer_tensors(members)

    def compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        from quantsink.weights.cpu_w4 import w4_linear_cpu

        return w4_linear_cpu(x, self.gather, self.n_q, self.group_size, self.tensors)


class FusedInt4(_Shared):
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

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n]``: every member's output columns for ``x``."""
        p = self.pack
        return int4pack_linear_cpu(x, p.packed, p.scales_zeros, p.gather_idx, p.outlier_idx,
                                   p.outlier_weight_t, self.bias, self.group_size, self.n, p.pad)


def _keep(m: Any) -> torch.Tensor:
    from quantsink.weights.outliers import split_columns

    return split_columns(m.in_features, m.outlier_idx.cpu())


def _key(m: Any) -> tuple | None:
    """Layers with equal keys read the same input; None: unknown (no outlier channels)."""
    if not m.n_outliers:
        return None  # o_proj would look like q/k/v: fusing it would only repeat work
    return (m.in_features, m.group_size, tuple(m.outlier_idx.tolist()))


def _w4_member_plan(fused: FusedW4, m: Any, i: int) -> backend.Plan:
    """``m``'s plan, reading output ``i`` of the group's shared call."""
    from quantsink.weights import cpu_w4

    own = backend.build_plan(m, torch.device("cpu"), "cpu")  # traced and many rows: m's own path

    def eager(x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= cpu_w4.W4_MAX_ROWS * x.shape[-1]:
            return fused.outputs(x)[i]
        return own.eager(x)

    return backend.bound_plan(m, torch.device("cpu"), "cpu", eager, own.traced, fused=True)


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

    return backend.bound_plan(m, torch.device("cpu"), "int4pack", eager, traced, fused=True)


def _candidate(m: Any) -> bool:
    from quantsink.weights.linear import QuantLinear

    return (isinstance(m, QuantLinear) and _key(m) is not None
            and backend.choose(m, m.weight_packed.device) in ("cpu", "int4pack"))


def fuse_siblings(model: nn.Module, after_each: Any = None) -> int:
    """Fuse the int4pack siblings of every module of ``model`` (their plans are replaced, no
    converted tensors of their own are made); returns the number of layers fused.

    ``after_each()`` runs after each fused group (``prepare_model`` frees memory there).
    """
    if backend.requested_backend() not in ("auto", "cpu", "int4pack"):
        return 0
    fused_layers = 0
    for parent in model.modules():
        groups: dict[tuple, list] = {}
        for child in parent.children():
            if _candidate(child):
                kind = backend.choose(child, child.weight_packed.device)
                groups.setdefault((kind, _key(child)), []).append(child)
        for (kind, _), members in ((k, g) for k, g in groups.items() if len(g) > 1):
            if kind == "cpu":
                w4 = FusedW4(members)
                for i, m in enumerate(members):
                    m._plan = _w4_member_plan(w4, m, i)
            else:
                fused, lo = FusedInt4(members), 0
                for m in members:
                    m._plan = _member_plan(fused, m, lo)
                    lo += m.out_features
            fused_layers += len(members)
            if after_each is not None:
                after_each()
    return fused_layers
