"""Packed MoE experts: every expert's matrix int-``bits`` group-wise with fp16 outlier channels.

:class:`PackedExperts` holds one projection (``gate_up_proj``, ``up_proj`` or ``down_proj``)
of all ``E`` experts, each expert stored like a :class:`~quantsink.weights.linear.QuantLinear`
weight (Linear orientation ``[out, in]``, whatever the family's storage orientation), with a
leading expert dimension. Buffers (saved under ``<experts>.<proj>.<name>``):

- ``weight_packed`` int32 ``[E, out, ceil(n_q * bits / 32)]`` (``n_q = in - k``; layout of
  :mod:`quantsink.weights.pack`), ``weight_scale`` fp16 and ``weight_zero_point`` uint8
  ``[E, out, ceil(n_q / group_size)]``, ``weight_shape`` int64 ``[3] = [E, out, in]``;
- ``outlier_idx`` int64 ``[E, k]`` (ascending per expert) and ``outlier_weight`` fp16
  ``[E, out, k]``: each expert's own fp16 input channels.

:class:`QuantExperts` replaces the family's experts module: same routing call, same biases
(``<proj>_bias``, floating point), the family's own activation (``_apply_gate`` /
``act_fn``), and :func:`expert_linear` for every expert's projection, which dequantizes one
expert at a time, transiently (no dense copy of the experts is ever kept).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantsink.hf.moe import (ExpertsLayout, expert_matrices, experts_forward, experts_layout,
                              module_gate, routing_arguments)
from quantsink.weights.outliers import outlier_count, split_columns
from quantsink.weights.pack import pack_codes, packed_width, unpack_codes
from quantsink.weights.rtn import dequantize_codes, n_groups

_SCALARS = (bool, int, float, str, type(None))


class PackedExperts(nn.Module):
    """One projection of ``num_experts`` experts, packed (see the module docstring)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, bits: int,
                 group_size: int, n_outliers: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.bits, self.group_size, self.n_outliers = bits, group_size, n_outliers
        n_q, e, kw = in_features - n_outliers, num_experts, dict(device=device)
        g = n_groups(n_q, group_size)
        self.register_buffer("weight_packed", torch.zeros(e, out_features, packed_width(n_q, bits),
                                                          dtype=torch.int32, **kw))
        self.register_buffer("weight_scale", torch.ones(e, out_features, g, dtype=torch.float16, **kw))
        self.register_buffer("weight_zero_point", torch.zeros(e, out_features, g, dtype=torch.uint8, **kw))
        self.register_buffer("weight_shape", torch.tensor([e, out_features, in_features],
                                                          dtype=torch.int64, device=device))
        self.register_buffer("outlier_idx", torch.zeros(e, n_outliers, dtype=torch.int64, **kw))
        self.register_buffer("outlier_weight", torch.zeros(e, out_features, n_outliers,
                                                           dtype=torch.float16, **kw))

    @torch.no_grad()
    def set_expert(self, e: int, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   outlier_idx: torch.Tensor, outlier_weight: torch.Tensor) -> None:
        """Store expert ``e``: codes ``[out, n_q]``, grids ``[out, G]``, outliers ``[k]``, ``[out, k]``."""
        self.weight_packed[e].copy_(pack_codes(codes, self.bits))
        self.weight_scale[e].copy_(scale.half())
        self.weight_zero_point[e].copy_(zero.to(torch.uint8))
        self.outlier_idx[e].copy_(outlier_idx.long())
        self.outlier_weight[e].copy_(outlier_weight.half())

    def dequantize(self, e: int) -> torch.Tensor:
        """Expert ``e``'s effective weight ``[out, in]`` in float32."""
        n_q = self.in_features - self.n_outliers
        codes = unpack_codes(self.weight_packed[e], self.bits, n_q)  # [out, n_q]
        wq = dequantize_codes(codes, self.weight_scale[e].float(), self.weight_zero_point[e].float(),
                              self.group_size)
        idx = self.outlier_idx[e]
        w = torch.empty(self.out_features, self.in_features, device=wq.device)
        w[:, split_columns(self.in_features, idx.cpu()).to(wq.device)] = wq
        w[:, idx] = self.outlier_weight[e].float()
        return w

    def packed_nbytes(self) -> int:
        """Bytes of everything this projection stores."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features="
                f"{self.out_features}, bits={self.bits}, group_size={self.group_size}, "
                f"n_outliers={self.n_outliers}")


def expert_linear(packed: PackedExperts, e: int, x: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [S, in] -> [S, out]`` through expert ``e`` of ``packed`` (plus ``bias [out]``).

    The one place that turns packed expert weights into a product: the torch reference
    dequantizes the expert transiently; a fused int4 kernel can replace this function.
    """
    w = packed.dequantize(e).to(x.dtype)  # [out, in], freed after the call
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


class QuantExperts(nn.Module):
    """A family's experts module with :class:`PackedExperts` projections.

    ``family`` is the replaced module's class: its forward signature binds the routing call
    and its ``_apply_gate`` (or the carried ``act_fn``) is the activation. Scalar settings
    of the replaced module (e.g. GPT-OSS's ``alpha`` and ``limit``) are carried over.
    """

    def __init__(self, source: nn.Module, packed: dict[str, PackedExperts],
                 layout: ExpertsLayout | None = None) -> None:
        super().__init__()
        self.layout = layout or experts_layout(source)
        self.family = type(source)
        for key, value in vars(source).items():
            if not key.startswith("_") and isinstance(value, _SCALARS) and key != "training":
                setattr(self, key, value)
        self.config = getattr(source, "config", None)
        for name, child in source.named_children():
            self.add_module(name, child)  # e.g. act_fn
        for proj in self.layout.projections:
            self.add_module(proj, packed[proj])
            if self.layout.has_bias:
                bias = getattr(source, f"{proj}_bias")
                self.register_parameter(f"{proj}_bias", nn.Parameter(bias.detach(), requires_grad=False))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden, index, weights = routing_arguments(self, self.family, args, kwargs)
        return experts_forward(self, self.layout, hidden, index, weights, self._linear,
                               module_gate(self, self.family, self.layout))

    def _linear(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self, f"{proj}_bias") if self.layout.has_bias else None
        return expert_linear(getattr(self, proj), e, x, None if bias is None else bias[e])

    def packed_nbytes(self) -> int:
        """Bytes of the packed projections (biases excluded)."""
        return sum(getattr(self, p).packed_nbytes() for p in self.layout.projections)

    def extra_repr(self) -> str:
        return f"family={self.family.__name__}, experts={self.layout.num_experts}"


def experts_shell(source: nn.Module, bits: int, group_size: int, outlier_channels: int) -> QuantExperts:
    """An empty :class:`QuantExperts` shaped like ``source`` (on its device, e.g. meta), for loading."""
    layout = experts_layout(source)
    packed = {}
    for proj in layout.projections:
        w = getattr(source, proj)
        _, out, inp = expert_matrices(source, layout, proj).shape
        k = outlier_count(outlier_channels, inp)
        packed[proj] = PackedExperts(layout.num_experts, inp, out, bits, group_size, k, device=w.device)
    return QuantExperts(source, packed, layout)


def is_quantized_experts(module: nn.Module) -> bool:
    """True for a :class:`QuantExperts`."""
    return isinstance(module, QuantExperts)

