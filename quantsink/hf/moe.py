"""transformers' mixture-of-experts layouts: 3-D expert weights inside an experts module.

transformers 5.x stores the experts of a sparse MoE block as 3-D parameters of one module
decorated with ``use_experts_implementation``, which records the layout in flags on the
instance (the same flags its generic ``batched_mm`` / ``grouped_mm`` forwards read):

- ``has_gate``: ``gate_up_proj`` (gate and up in one matrix; split by the module's
  ``_apply_gate``: concatenated halves for Qwen3-MoE / Mixtral / OLMoE, interleaved columns
  with a clamped gated activation for GPT-OSS), else ``up_proj`` and ``act_fn``;
- ``is_transposed``: weights stored ``[E, in, out]`` (``x @ W[e]``, GPT-OSS) instead of
  ``[E, out, in]`` (``F.linear(x, W[e])``);
- ``has_bias``: ``<proj>_bias`` ``[E, out]``;
- ``has_post_expert_norm`` (not supported here).

:func:`experts_forward` is the eager experts loop of those families with the per-expert
matrix product left to a callback, so the same code runs dense weights (calibration
statistics, checked against the module's own forward) and packed ones. The router (a
sibling of the experts module whose weight has one row per expert) is not an expert.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from quantsink.errors import check

FLAGS = ("has_gate", "is_transposed", "has_bias")
ROUTER_NAMES = ("router", "gate")


@dataclass(frozen=True)
class ExpertsLayout:
    """How one experts module stores its weights."""

    num_experts: int
    projections: tuple[str, ...]  # ("gate_up_proj", "down_proj") or ("up_proj", "down_proj")
    is_transposed: bool  # stored [E, in, out] instead of [E, out, in]
    has_bias: bool  # <proj>_bias [E, out]
    has_gate: bool  # gated: the first projection goes through the module's _apply_gate


def is_experts(module: nn.Module) -> bool:
    """True for a transformers experts module (3-D expert weights plus the layout flags)."""
    if not all(isinstance(getattr(module, f, None), bool) for f in FLAGS):
        return False
    return any(p.dim() == 3 for p in module.parameters(recurse=False)) or hasattr(module, "layout")


def experts_layout(module: nn.Module) -> ExpertsLayout:
    """The :class:`ExpertsLayout` of a transformers experts module (one line when unsupported)."""
    name = type(module).__name__
    check(not getattr(module, "has_post_expert_norm", False),
          f"{name}: experts with a post-expert norm are not supported; allowed: gated or plain "
          "experts without one (GPT-OSS, Qwen3-MoE, Mixtral, OLMoE layouts)")
    check(not getattr(module, "_is_expert_parallel", False),
          f"{name}: expert-parallel experts are not supported; allowed: all experts on one device")
    first = "gate_up_proj" if module.has_gate else "up_proj"
    projections = (first, "down_proj")
    weights = [getattr(module, p, None) for p in projections]
    check(all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights),
          f"{name}: expected 3-D parameters {list(projections)}; allowed: transformers experts modules")
    num = int(weights[0].shape[0])
    check(int(weights[1].shape[0]) == num and getattr(module, "num_experts", num) == num,
          f"{name}: {list(projections)} disagree on the number of experts")
    if module.has_bias:
        check(all(isinstance(getattr(module, f"{p}_bias", None), torch.Tensor) for p in projections),
              f"{name}: has_bias is set but {[f'{p}_bias' for p in projections]} are missing")
    return ExpertsLayout(num, projections, bool(module.is_transposed), bool(module.has_bias),
                         bool(module.has_gate))


def expert_matrices(module: nn.Module, layout: ExpertsLayout, proj: str) -> torch.Tensor:
    """The weights of projection ``proj`` of every expert, Linear-oriented: ``[E, out, in]``."""
    w = getattr(module, proj).detach()
    return w.transpose(1, 2) if layout.is_transposed else w


def expert_bias(module: nn.Module, layout: ExpertsLayout, proj: str) -> torch.Tensor | None:
    """``[E, out]`` bias of ``proj``, or None."""
    return getattr(module, f"{proj}_bias") if layout.has_bias else None


def find_experts(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name relative to the layer, module)`` of every experts module in a decoder layer."""
    return [(n, m) for n, m in layer.named_modules() if is_experts(m)]


def routers(layer: nn.Module) -> dict[str, str]:
    """Router weights of the layer's MoE blocks: ``{parameter name: reason}`` (they stay float).

    A router is a sibling of an experts module, named ``router`` / ``gate`` (or ``*_gate``),
    whose weight has one row per expert (or one row: a shared-expert gate).
    """
    out: dict[str, str] = {}
    for name, experts in find_experts(layer):
        parent_name = name.rpartition(".")[0]
        parent = layer.get_submodule(parent_name) if parent_name else layer
        n = (getattr(experts, "layout", None) or experts_layout(experts)).num_experts
        for child_name, child in parent.named_children():
            w = getattr(child, "weight", None)
            named = child_name in ROUTER_NAMES or child_name.endswith("_gate")
            if child is experts or not named or not isinstance(w, torch.Tensor) or w.dim() != 2:
                continue
            if w.shape[0] in (n, 1):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                out[f"{full}.weight"] = "router"
    return out


@functools.lru_cache(maxsize=64)
def _signature(family: type) -> inspect.Signature:
    return inspect.signature(family.forward)


def routing_arguments(module: nn.Module, family: type, args: tuple, kwargs: dict
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` of an experts call,
    whatever the family names them (bound against ``family.forward``)."""
    bound = _signature(family).bind(module, *args, **kwargs)
    values = list(bound.arguments.values())[1:4]
    check(len(values) == 3 and all(isinstance(v, torch.Tensor) for v in values),
          f"{family.__name__}: an experts call needs hidden states, expert indices and weights")
    return values[0], values[1], values[2]


def experts_forward(module: nn.Module, layout: ExpertsLayout, hidden: torch.Tensor,
                    top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    linear: Callable[[str, int, torch.Tensor], torch.Tensor],
                    gate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The eager experts loop: ``[T, H]`` out of ``hidden [T, H]`` routed by ``top_k_index``
    (``[T, k]``, expert ids; ``num_experts`` marks a dropped slot) with ``top_k_weights [T, k]``.

    ``linear(proj, e, x [S, in]) -> [S, out]`` is expert ``e``'s projection (bias included);
    ``gate(h [S, out]) -> [S, I]`` the activation between the two projections.
    """
    out = torch.zeros_like(hidden)
    with torch.no_grad():
        hit = torch.unique(top_k_index[top_k_index < layout.num_experts]).tolist()
    first, down = layout.projections
    for e in hit:
        token, slot = torch.where(top_k_index == e)  # [S] each
        h = gate(linear(first, e, hidden[token]))
        y = linear(down, e, h) * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def module_gate(module: nn.Module, family: type, layout: ExpertsLayout
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation of ``family`` between the two projections, bound to ``module``."""
    if layout.has_gate:
        return lambda h: family._apply_gate(module, h)
    return module.act_fn
