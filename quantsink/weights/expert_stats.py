"""Per-expert calibration statistics: each expert sees only the tokens routed to it.

:class:`ExpertsObserver` hooks one experts module for one layer pass. Its pre-hook replays
the call with :func:`~quantsink.hf.moe.experts_forward` over the dense weights and records,
for every expert and projection, the input's absmax, ``sum X^T X`` (GPTQ) and the number
of routed tokens; its forward hook checks that this replay equals the module's own output
(one line if a family computes something else). Experts that get fewer than ``min_tokens``
are RTN-quantized; their absmax (outlier channels, clip weights) then comes from all the
calibration tokens of the layer sent through the expert (:meth:`ExpertsObserver.group`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantsink.errors import QuantsinkError
from quantsink.hf.moe import (expert_bias, expert_matrices, experts_forward, experts_layout,
                              module_gate, routing_arguments)
from quantsink.weights.groups import InputGroup

REL_TOL = 1e-4  # replay vs the module's own output, relative to the output's absmax


class ExpertsObserver:
    """Statistics of one experts module over the calls of one layer pass."""

    def __init__(self, module: nn.Module, name: str, hessian: bool) -> None:
        self.module, self.name, self.hessian = module, name, hessian
        self.layout = experts_layout(module)
        self.family = type(module)
        e = self.layout.num_experts
        self.tokens = torch.zeros(e, dtype=torch.int64)
        self.absmax: dict[tuple[str, int], torch.Tensor] = {}
        self.xtx: dict[tuple[str, int], torch.Tensor] = {}
        self.inputs: list[torch.Tensor] = []  # [T, H] of every call, for the fallback statistics
        self.expected: torch.Tensor | None = None

    def attach(self) -> list[Any]:
        """Install the hooks; returns their handles."""
        return [self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
                self.module.register_forward_hook(self._post, with_kwargs=True)]

    @torch.no_grad()
    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, index, weights = routing_arguments(module, self.family, args, kwargs)
        self.inputs.append(hidden.detach())
        for e in torch.unique(index[index < self.layout.num_experts]).tolist():
            self.tokens[e] += int((index == e).any(-1).sum())
        self.expected = experts_forward(module, self.layout, hidden, index, weights,
                                        lambda p, e, x: self._observe(p, e, x),
                                        module_gate(module, self.family, self.layout))

    @torch.no_grad()
    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        diff = float((out.float() - self.expected.float()).abs().max())
        scale = max(1.0, float(out.float().abs().max()))
        self.expected = None
        if diff > REL_TOL * scale:
            raise QuantsinkError(f"{self.name} ({self.family.__name__}): the experts forward differs from "
                                 f"quantsink's reading of its layout {self.layout} by {diff:.3g}; allowed: "
                                 "experts that follow transformers' use_experts_implementation flags")

    def _dense(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        w = expert_matrices(self.module, self.layout, proj)[e]  # [out, in]
        bias = expert_bias(self.module, self.layout, proj)
        return F.linear(x, w.to(x.dtype), None if bias is None else bias[e].to(x.dtype))

    def _observe(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()  # [S, in]
        key = (proj, e)
        amax = x2.abs().amax(0)
        self.absmax[key] = amax if key not in self.absmax else torch.maximum(self.absmax[key], amax)
        if self.hessian:
            xtx = x2.T @ x2
            self.xtx[key] = xtx if key not in self.xtx else self.xtx[key] + xtx
        return self._dense(proj, e, x)

    @torch.no_grad()
    def group(self, proj: str, e: int, fallback: bool) -> InputGroup:
        """Statistics of expert ``e``'s ``proj`` input: its routed tokens, or (``fallback``) all
        calibration tokens sent through the expert (absmax only, for RTN)."""
        mats = expert_matrices(self.module, self.layout, proj)
        if fallback:
            return InputGroup([f"{self.name}.{proj}[{e}]"], self._all_tokens_absmax(proj, e, mats.shape[2],
                                                                                     mats.device))
        tokens = int(self.tokens[e])
        h = self.xtx[(proj, e)] / tokens if self.hessian else None
        return InputGroup([f"{self.name}.{proj}[{e}]"], self.absmax[(proj, e)], h, tokens)

    def _all_tokens_absmax(self, proj: str, e: int, n_in: int, device: torch.device) -> torch.Tensor:
        x = torch.cat(self.inputs) if self.inputs else torch.zeros(0, n_in, device=device)  # [T, H]
        first = self.layout.projections[0]
        if proj != first:
            x = module_gate(self.module, self.family, self.layout)(self._dense(first, e, x))
        return x.float().abs().amax(0) if x.shape[0] else torch.zeros(n_in, device=device)
