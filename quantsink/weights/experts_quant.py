"""Quantizing one MoE experts module expert by expert.

Every expert's matrix of every projection is quantized on its own, with the scheme of the
dense layers (:func:`~quantsink.weights.layer.quantize_matrix`: int-``bits`` groups along
the input channels, fp16 outlier input channels chosen per expert, massive residual
channels forced for inputs of the hidden size). GPTQ uses the Hessian of the tokens routed
to that expert; an expert with fewer than ``weights.expert_min_tokens`` routed tokens is
RTN-quantized instead, its outlier channels and clip weights taken from all the layer's
calibration tokens sent through it (and reported). The module is then replaced by a
:class:`~quantsink.weights.experts.QuantExperts`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from quantsink.errors import check
from quantsink.hf.moe import expert_matrices, experts_layout
from quantsink.weights.config import WeightConfig
from quantsink.weights.experts import PackedExperts, QuantExperts
from quantsink.weights.layer import check_group_stats, quantize_matrix
from quantsink.weights.outliers import outlier_count
from quantsink.weights.groups import InputGroup, set_submodule


def _fallback(cfg: WeightConfig, tokens: torch.Tensor | None) -> list[int]:
    """Experts with fewer than ``expert_min_tokens`` routed tokens: RTN (whatever the recipe's
    algorithm) with the statistics of all calibration tokens sent through the expert."""
    if tokens is None:
        return []
    return [e for e, t in enumerate(tokens.tolist()) if t < cfg.expert_min_tokens]


def _pack_projection(w: torch.Tensor, cfg: WeightConfig, groups: Callable[[int, bool], InputGroup],
                     fallback: list[int], forced: list[int], where: str = "experts"
                     ) -> tuple[PackedExperts, list[int]]:
    """Quantize ``w [E, out, in]`` expert by expert into a :class:`PackedExperts`.

    ``groups(e, fallback)`` gives expert ``e``'s statistics. An expert whose GPTQ Hessian
    cannot be factorised (too few distinct tokens for its width) is RTN-quantized like the
    starved ones; returns the packed projection and those experts.
    """
    e_count, out, inp = w.shape
    packed = PackedExperts(e_count, inp, out, cfg.bits, cfg.group_size,
                           outlier_count(cfg.outlier_channels, inp))
    rtn, failed = dataclasses.replace(cfg, algorithm="rtn"), []  # widths: check_outlier_channels
    for e in range(e_count):
        group = groups(e, e in fallback)
        check_group_stats(group, f"{where} (expert {e})")
        try:
            q = quantize_matrix(w[e].float(), group, rtn if e in fallback else cfg, forced)
        except torch.linalg.LinAlgError:
            failed.append(e)
            q = quantize_matrix(w[e].float(), groups(e, True), rtn, forced)
        packed.set_expert(e, *q)
    return packed, failed


def _static_group(name: str, inp: int, cfg: WeightConfig) -> InputGroup:
    check(cfg.algorithm == "rtn" and cfg.outlier_channels == 0,
          f"{name}: MoE experts need calibration windows for GPTQ or outlier channels (a calibration "
          "artifact has no per-expert statistics); allowed: --calib PATH, or an RTN recipe without outliers")
    return InputGroup([name], torch.zeros(inp))


def make_experts_quantizer(cfg: WeightConfig, massive: list[int], hidden_size: int
                           ) -> Callable[[nn.Module, str, str, Any], list[dict]]:
    """A ``quantize_experts(layer, prefix, name, observer)`` callback for
    :func:`~quantsink.weights.sequential.quantize_layers` (``observer``: an
    :class:`~quantsink.weights.expert_stats.ExpertsObserver`, or None without windows)."""
    def quantize_experts(layer: nn.Module, prefix: str, name: str, observer: Any) -> list[dict]:
        module = layer.get_submodule(name)
        layout, full = experts_layout(module), f"{prefix}.{name}"
        tokens = None if observer is None else observer.tokens.clone()
        fallback = _fallback(cfg, tokens)
        packed, reports, failed = {}, [], set()
        for proj in layout.projections:
            w = expert_matrices(module, layout, proj)  # [E, out, in]
            inp = w.shape[2]
            forced = massive if cfg.massive_outliers and inp == hidden_size else []
            stats = (lambda e, fb, proj=proj, inp=inp: _static_group(full, inp, cfg) if observer is None
                     else observer.group(proj, e, fb))
            packed[proj], bad = _pack_projection(w, cfg, stats, fallback, forced, f"{full}.{proj}")
            failed.update(bad)
            reports.append({"name": f"{full}.{proj}", "module": full, "kind": "experts",
                            "experts": layout.num_experts, "in": inp, "out": w.shape[1],
                            "outliers": packed[proj].n_outliers, "fp16_bytes": 2 * w.numel(),
                            "packed_bytes": packed[proj].packed_nbytes()})
        reports[0].update(routed_tokens=None if tokens is None else tokens.tolist(),
                          rtn_fallback=sorted(set(fallback) | failed), gptq_failed=sorted(failed),
                          min_tokens=cfg.expert_min_tokens)
        device = expert_matrices(module, layout, layout.projections[0]).device
        set_submodule(layer, name, QuantExperts(module, packed, layout).to(device))
        return reports
    return quantize_experts
