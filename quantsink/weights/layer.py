"""Quantizing one group of Linear layers that share an input (q/k/v, gate/up, ...).

The group's weights are stacked along the output dimension ``W: [sum(out), in]``; the
outlier input channels are chosen once for the group; the kept channels are quantized
(RTN, or GPTQ with the group's Hessian, the outlier columns placed last so that they
absorb part of the rounding error); the rows are split back into one
:class:`~quantsink.weights.linear.QuantLinear` per original layer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from quantsink.errors import QuantsinkError, check
from quantsink.weights.config import WeightConfig
from quantsink.weights.gptq import gptq_quantize
from quantsink.weights.groups import InputGroup, is_ignored, set_submodule
from quantsink.weights.linear import QuantLinear
from quantsink.weights.outliers import channel_scores, outlier_count, select_outliers, split_columns
from quantsink.weights.rtn import dequantize_codes, rtn_quantize


def outlier_indices(w: torch.Tensor, group: InputGroup, cfg: WeightConfig, forced: list[int]
                    ) -> torch.Tensor:
    """The group's fp16 outlier channels (int64, ascending): ``group.extra["outlier_idx"]`` when
    the scale search fixed them (chosen on the unscaled statistics), else by ``cfg.outlier_score``."""
    if "outlier_idx" in group.extra:
        return group.extra["outlier_idx"]
    k = outlier_count(cfg.outlier_channels, w.shape[1])
    return select_outliers(channel_scores(group.absmax, w, cfg.outlier_score), k, forced)


def quantize_matrix(w: torch.Tensor, group: InputGroup, cfg: WeightConfig, forced: list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes [out, n_q], scale [out, G], zero [out, G], outlier_idx [k], outlier_w [out, k])``.

    GPTQ consumes ``group.hessian`` (set to None once gathered in the quantization order)."""
    n = w.shape[1]
    idx = outlier_indices(w, group, cfg, forced)
    keep = split_columns(n, idx)
    grid = dict(clip_search=cfg.clip_search, clip_grid=cfg.clip_grid, min_clip=cfg.min_clip)
    if cfg.algorithm == "gptq":
        check(group.hessian is not None, "GPTQ needs the layer Hessian; pass calibration windows")
        perm = torch.cat([keep, idx])
        h = group.hessian[perm[:, None], perm]  # one gather, no [perm] intermediate
        group.hessian = None  # consumed: a big layer's [in, in] matrix is not kept twice
        codes, scale, zero, rest = gptq_quantize(w[:, perm], h, keep.numel(), cfg.bits,
                                                 cfg.group_size, cfg.symmetric, cfg.damp,
                                                 cfg.act_order, **grid)
        return codes, scale, zero, idx, rest
    weight = group.absmax[keep].float() ** 2 if bool(group.absmax.any()) else None
    codes, scale, zero = rtn_quantize(w[:, keep], cfg.bits, cfg.group_size, cfg.symmetric,
                                      col_weight=weight, **grid)
    return codes, scale, zero, idx, w[:, idx]


def check_group_stats(group: InputGroup, where: str) -> None:
    """Refuse non-finite calibration statistics of the input of ``where`` (overflowing or NaN
    activations would otherwise turn into NaN scales or a failed factorisation)."""
    for stat, t in (("input absmax", group.absmax), ("input Hessian", group.hessian)):
        check(t is None or bool(torch.isfinite(t).all()),
              f"calibration activations are not finite at the input of {where} ({stat} has NaN/Inf); "
              "allowed: a model whose float32 forward stays finite on the calibration data")


def _quantize_checked(w: torch.Tensor, group: InputGroup, cfg: WeightConfig, forced: list[int],
                      where: str) -> tuple[torch.Tensor, ...]:
    """:func:`quantize_matrix` with the statistics checked and a failed GPTQ factorisation named."""
    check_group_stats(group, where)
    try:
        return quantize_matrix(w, group, cfg, forced)
    except torch.linalg.LinAlgError:
        raise QuantsinkError(f"GPTQ failed at {where}: its input Hessian is not positive definite even "
                             f"with weights.damp={cfg.damp}; allowed: a larger weights.damp (< 1), more "
                             "calibration data, or weights.algorithm: rtn") from None


def rtn_dequantized(w: torch.Tensor, group: InputGroup, cfg: WeightConfig, forced: list[int]
                    ) -> torch.Tensor:
    """``w [out, in]`` as ``cfg``'s grid stores it (RTN without clip search, the fp16 outlier
    columns the group would keep left exact): the fast quantizer of the AWQ-style scale search."""
    fast = dataclasses.replace(cfg, algorithm="rtn", clip_search=False)
    codes, scale, zero, idx, rest = quantize_matrix(w, group, fast, forced)
    out = torch.empty_like(w, dtype=torch.float32)
    out[:, split_columns(w.shape[1], idx)] = dequantize_codes(codes, scale.float(), zero.float(), cfg.group_size)
    out[:, idx] = rest.float()
    return out


SearchQuantizer = tuple[Callable[[torch.Tensor, InputGroup], torch.Tensor],
                        Callable[[torch.Tensor, InputGroup], torch.Tensor]]


def make_search_quantizer(cfg: WeightConfig, massive: list[int], hidden_size: int,
                          group_size: Callable[[str, list[str]], int] | None = None
                          ) -> Callable[[str, list[str]], SearchQuantizer]:
    """``quantizer_for(prefix, names) -> (quantize, outliers)``: the search quantizer of a group
    (its group size from ``group_size(prefix, names)``, default the recipe's) and its fp16 outlier
    channel choice (massive channels forced as in :func:`make_group_quantizer`)."""
    def quantizer_for(prefix: str, names: list[str]) -> SearchQuantizer:
        g = cfg.group_size if group_size is None else group_size(prefix, names)
        gcfg = cfg if g == cfg.group_size else dataclasses.replace(cfg, group_size=g)

        def forced(w: torch.Tensor) -> list[int]:
            return massive if cfg.massive_outliers and w.shape[1] == hidden_size else []

        def quantize(w: torch.Tensor, group: InputGroup) -> torch.Tensor:
            return rtn_dequantized(w, group, gcfg, forced(w))

        def outliers(w: torch.Tensor, group: InputGroup) -> torch.Tensor:
            return outlier_indices(w, group, gcfg, forced(w))
        return quantize, outliers
    return quantizer_for


def make_group_quantizer(cfg: WeightConfig, massive: list[int], hidden_size: int
                         ) -> Callable[[nn.Module, str, InputGroup], list[dict]]:
    """A ``quantize_group(layer, prefix, group)`` callback for :func:`quantize_layers`.

    ``massive`` residual channels are forced among the outliers of layers whose input has
    ``hidden_size`` channels (the normed residual stream).
    """
    def quantize_group(layer: nn.Module, prefix: str, group: InputGroup) -> list[dict]:
        names = [n for n in group.names if not is_ignored(f"{prefix}.{n}", cfg.ignore)]
        if not names:
            return []
        mods = [layer.get_submodule(n) for n in names]
        w = torch.cat([m.weight.detach().float() for m in mods])  # [sum(out), in]
        forced = massive if cfg.massive_outliers and w.shape[1] == hidden_size else []
        codes, scale, zero, idx, rest = _quantize_checked(w, group, cfg, forced, f"{prefix}.{names[0]}")
        reports, row = [], 0
        for name, mod in zip(names, mods):
            rows = slice(row, row + mod.out_features)
            row = rows.stop
            bias = None if mod.bias is None else mod.bias.detach()
            q = QuantLinear.from_quantized(codes[rows], scale[rows], zero[rows], idx, rest[rows],
                                           cfg.bits, cfg.group_size, bias).to(mod.weight.device)
            set_submodule(layer, name, q)
            reports.append({"name": f"{prefix}.{name}", "in": mod.in_features,
                            "out": mod.out_features, "outliers": int(idx.numel()),
                            "fp16_bytes": 2 * mod.weight.numel(), "packed_bytes": q.packed_nbytes(),
                            **group.extra.get("report", {})})
        return reports
    return quantize_group


def static_groups(cal: Any) -> Callable[[str, nn.Module], list[InputGroup]]:
    """Groups of one Linear each, with ``act_absmax`` from a calibration result (no forward pass).

    Without a calibration result the absmax is zero (fine for recipes without outliers).
    """
    stats = getattr(cal, "stats", None) or {}

    def groups(prefix: str, layer: nn.Module) -> list[InputGroup]:
        out = []
        for n, m in layer.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            key = f"act_absmax/{prefix}.{n}"
            check(cal is None or key in stats, f"calibration artifact has no {key!r}; allowed: "
                                               "an artifact calibrated on this model")
            absmax = stats[key].float() if key in stats else torch.zeros(m.in_features)
            out.append(InputGroup([n], absmax))
        return out
    return groups
