"""AWQ-style activation-aware input-channel scales, searched per Linear group and folded.

For a group of Linear layers reading the same input ``X`` (q/k/v, o, gate/up, down; stacked
weights ``W: [out, in]``), the scale ``s = m ** alpha`` of its input channels, ``m = mean |x|``
per channel (normalised by ``sqrt(max(s) * min(s))``), is searched over ``alpha`` in
``0, 1/n, ..., (n-1)/n`` (``n = weights.scale_grid``): each candidate quantizes ``W diag(s)``
with the group's own grid (RTN without clip search, outliers as the format keeps them) and is
scored by the group's output error on the calibration tokens,
``||(Q(W diag s) diag(1/s) - W) X^T||^2 = tr(D H D^T) * tokens`` with ``H = X^T X / tokens``
(exact; no activations are stored). With fp16 outlier channels (native format) those are chosen
first, on the unscaled statistics (``absmax_x_norm`` is invariant under the scaling, so this is
the choice the scaled weights would get), and keep ``s = 1``: they are exact in fp16 anyway, and a
small scale would blow up their Hessian entries and GPTQ's conditioning. ``alpha = 0`` is
``s = 1``, so the chosen error is never above the unscaled one; ``weights.scale_stats`` adds
candidate families (:func:`candidates`). The winner is folded (:mod:`quantsink.hf.fold`): ``1/s`` into the
producing norm (rounded to fp16 at once, and ``s`` recomputed from the rounded weight so that
the float function is unchanged) or the producing Linear's rows (v_proj for o_proj with one scale
per value head channel shared by its query heads; up_proj for down_proj); the group's weights
are multiplied by ``s``; its statistics become those of ``X / s`` (``H -> diag(1/s) H diag(1/s)``).
GPTQ (or RTN) then quantizes the scaled weights as usual. Every layer is run before and after
folding; a change of its output beyond float rounding is an error, never a silent result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from quantsink.errors import check
from quantsink.hf.capture import LayerCall
from quantsink.hf.fold import FoldSite, fold_sites
from quantsink.weights.groups import InputGroup

# w [out, in], the group with the statistics of the candidate's input -> dequantized w [out, in]
GroupQuantizer = Callable[[torch.Tensor, InputGroup], torch.Tensor]
FOLD_TOLERANCE = 1e-3  # relative change of a layer's update (output - input) allowed by folding


@dataclass
class Choice:
    """The searched scale of one group."""

    alpha: float
    scale: torch.Tensor  # [in] float32, > 0
    error: float  # output error of the chosen scale, per token
    error_unscaled: float  # the same at alpha = 0 (s = 1)
    stat: str = "mean"  # the statistic of the chosen scale ("none": s = 1)


def channel_scales(stat: torch.Tensor, alpha: float, repeat: int = 1, block: int = 1,
                   weight_stat: torch.Tensor | None = None) -> torch.Tensor:
    """``s [in] = stat ** alpha`` (``/ weight_stat ** (1 - alpha)`` with AWQ's duo scaling),
    normalised; with ``repeat > 1`` shared by the ``repeat`` consecutive blocks of ``block``
    channels that one value head serves (GQA)."""
    m = stat.float()
    wm = None if weight_stat is None else weight_stat.float()
    if repeat > 1:
        m = m.view(-1, repeat, block).mean(1)  # [kv_heads, head_dim]
        wm = None if wm is None else wm.view(-1, repeat, block).mean(1)
    s = m.pow(alpha)
    if wm is not None:
        s = s / (wm.pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    if repeat > 1:
        s = s.repeat_interleave(repeat, dim=0)  # [kv_heads * repeat, head_dim]
    return s.flatten()


def weight_mean(w: torch.Tensor) -> torch.Tensor:
    """AWQ's weight statistic ``[in]``: mean over output rows of ``|W|`` / its row maximum."""
    a = w.abs().float()
    return (a / a.amax(1, keepdim=True).clamp(min=1e-12)).mean(0)


def candidates(w: torch.Tensor, group: InputGroup, grid: int, stats: tuple[str, ...]
               ) -> list[tuple[str, float, torch.Tensor | None, torch.Tensor | None]]:
    """``(stat, alpha, statistic, weight statistic)`` of every scale tried after ``s = 1``:
    ``mean`` (AWQ's mean|x|) and ``absmax`` for alpha in ``1/n .. (n-1)/n``; ``duo``
    (mean|x| ** alpha / weight_mean ** (1 - alpha)) for alpha in ``0 .. (n-1)/n``."""
    out = []
    for name in stats:
        x = group.absmax if name == "absmax" else group.mean_abs
        wm = weight_mean(w) if name == "duo" else None
        out += [(name, i / grid, x, wm) for i in range(0 if name == "duo" else 1, grid)]
    return out


def scaled_group(group: InputGroup, s: torch.Tensor) -> InputGroup:
    """The statistics of the input ``X / s``."""
    h = None if group.hessian is None else group.hessian / s[:, None] / s[None, :]
    mean = None if group.mean_abs is None else group.mean_abs / s
    return InputGroup(list(group.names), group.absmax / s, h, group.tokens, dict(group.extra), mean)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(D H D^T)``, ``D = w_hat - w``: the squared output error per calibration token."""
    d = (w_hat - w).float()
    return float(((d @ hessian.float()) * d).sum(dtype=torch.float64))


def fixed_mask(n: int, fixed: torch.Tensor | None, repeat: int = 1, block: int = 1) -> torch.Tensor:
    """Channels ``[n]`` that keep ``s = 1``: ``fixed`` and, with GQA, the query-head channels
    that share a value channel with one of them."""
    mask = torch.zeros(n, dtype=torch.bool)
    if fixed is not None and fixed.numel():
        mask[fixed.long()] = True
        if repeat > 1:
            mask = mask.view(-1, repeat, block).any(1, keepdim=True).expand(-1, repeat, -1).flatten()
    return mask


def search_scale(w: torch.Tensor, group: InputGroup, quantize: GroupQuantizer, grid: int,
                 repeat: int = 1, block: int = 1, fixed: torch.Tensor | None = None,
                 stats: tuple[str, ...] = ("mean",)) -> Choice:
    """The best scale for the group's stacked weights ``w [out, in]``: ``s = 1`` or one of
    :func:`candidates`; the ``fixed`` channels (the fp16 outliers) keep ``s = 1``."""
    check(group.hessian is not None and group.mean_abs is not None,
          f"scale search of {group.names} needs the group's input statistics; pass calibration windows")
    keep = fixed_mask(w.shape[1], fixed, repeat, block)
    ones = torch.ones(w.shape[1], device=w.device)
    unscaled = output_error(w, quantize(w, group), group.hessian)
    best = Choice(0.0, ones, unscaled, unscaled, "none")
    for name, alpha, x, wm in candidates(w, group, grid, stats):
        s = channel_scales(x, alpha, repeat, block, wm)
        s[keep] = 1.0
        err = output_error(w, quantize(w * s, scaled_group(group, s)) / s, group.hessian)
        if err < best.error:
            best = Choice(alpha, s, err, unscaled, name)
    return best


@torch.no_grad()
def fold_norm(norm: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> torch.Tensor:
    """``norm.weight / s`` rounded to fp16, consumers' columns times the exact compensation;
    returns that compensation (the effective scale)."""
    n = norm.weight.detach().float()
    folded = (n / s).half().float()
    bad = (folded == 0) | ~torch.isfinite(folded)  # fp16 under/overflow: leave the channel unscaled
    folded[bad] = n[bad].half().float()
    eff = torch.where(folded != 0, n / folded, torch.ones_like(n))
    norm.weight.copy_(folded.to(norm.weight.dtype))
    for lin in consumers:
        lin.weight.mul_(eff.to(lin.weight.dtype)[None, :])
    return eff


@torch.no_grad()
def fold_rows(producer: nn.Linear, consumers: list[nn.Linear], s: torch.Tensor, repeat: int,
              block: int) -> torch.Tensor:
    """Producer rows (and bias) ``/ s``, consumers' columns ``* s``; returns ``s``."""
    rows = s.view(-1, repeat, block)[:, 0].flatten() if repeat > 1 else s  # one per producer row
    check(rows.numel() == producer.out_features,
          f"cannot fold {s.numel()} scales into {producer.out_features} rows (repeat {repeat})")
    producer.weight.div_(rows.to(producer.weight.dtype)[:, None])
    if producer.bias is not None:
        producer.bias.copy_((producer.bias / rows.to(producer.bias.dtype)).half().to(producer.bias.dtype))
    for lin in consumers:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
    return s


def _site_group(site: FoldSite, groups: list[InputGroup], prefix: str) -> InputGroup | None:
    """The planned group the site's consumers form (None when none of them is quantized)."""
    want = set(site.consumers)
    hits = [g for g in groups if want & set(g.names)]
    if not hits:
        return None
    check(len(hits) == 1 and set(hits[0].names) == want,
          f"{prefix}: {sorted(want)} should read one input tensor ({site.producer}) and all be "
          f"quantized, but the planned groups are {[g.names for g in hits]}; allowed: "
          "weights.scale_search: false, or no weights.ignore entry inside such a group")
    return hits[0]


def _apply(layer: nn.Module, site: FoldSite, group: InputGroup, choice: Choice) -> None:
    """Fold ``choice`` at ``site``; the group's statistics become those of the scaled input."""
    consumers = [layer.get_submodule(n) for n in site.consumers]
    if site.kind == "norm":
        eff = fold_norm(layer.get_submodule(site.producer), consumers, choice.scale)
    else:
        eff = fold_rows(layer.get_submodule(site.producer), consumers, choice.scale, site.repeat, site.block)
    new = scaled_group(group, eff)
    group.absmax, group.hessian, group.mean_abs = new.absmax, new.hessian, new.mean_abs
    group.extra["report"] = {"scale_alpha": choice.alpha, "scale_stat": choice.stat,
                             "scale_fold": site.producer,
                             "scale_error": choice.error, "scale_error_unscaled": choice.error_unscaled}


def _check_unchanged(layer: nn.Module, prefix: str, hidden: torch.Tensor, call: LayerCall,
                     ref: torch.Tensor) -> float:
    """Relative change of the layer's update after folding; one-line error above the tolerance."""
    with torch.no_grad():
        out = call.run(layer, hidden)
    rel = float((out - ref).norm() / (ref - hidden).norm().clamp(min=1e-30))
    check(rel <= FOLD_TOLERANCE, f"{prefix}: folding the searched scales changed the float layer's "
                                 f"output by {rel:.1e} (relative), above {FOLD_TOLERANCE:g}; the fold "
                                 "does not match this architecture; allowed: weights.scale_search: false")
    return rel


def make_layer_scaler(model: nn.Module, grid: int,
                      quantizer_for: Callable[[str, list[str]], tuple[GroupQuantizer, Any]],
                      stats: tuple[str, ...] = ("mean",), ignored: Callable[[str], bool] | None = None
                      ) -> Callable[[nn.Module, str, list[InputGroup], torch.Tensor, LayerCall], None]:
    """A ``prepare_layer(layer, prefix, groups, hidden, call)`` callback for
    :func:`~quantsink.weights.sequential.quantize_layers`: search and fold every site of the
    layer (q/k/v, o, gate/up, down, in that order) before any of its groups is quantized.
    ``quantizer_for(prefix, names)`` gives the search quantizer of a group and its outlier choice;
    a site with an ``ignored`` (kept floating-point) consumer is left unscaled."""
    def prepare(layer: nn.Module, prefix: str, groups: list[InputGroup], hidden: torch.Tensor,
                call: LayerCall) -> None:
        with torch.no_grad():
            ref = call.run(layer, hidden)
        for site in fold_sites(model, layer):
            group = _site_group(site, groups, prefix)
            if group is None or (ignored is not None and any(ignored(f"{prefix}.{n}") for n in group.names)):
                continue
            w = torch.cat([layer.get_submodule(n).weight.detach().float() for n in group.names])
            quantize, outliers = quantizer_for(prefix, group.names)
            group.extra["outlier_idx"] = outliers(w, group)  # on the unscaled statistics
            choice = search_scale(w, group, quantize, grid, site.repeat, site.block,
                                  group.extra["outlier_idx"], stats)
            _apply(layer, site, group, choice)
        rel = _check_unchanged(layer, prefix, hidden, call, ref)
        for g in groups:
            if "report" in g.extra:
                g.extra["report"]["scale_fold_rel_change"] = rel
    return prepare


def scale_summary(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per searched group (from the per-module reports): first Linear, alpha, errors."""
    rows, seen = [], set()
    for r in reports:
        key = (r["name"].rsplit(".", 2)[0], r.get("scale_fold"))
        if "scale_alpha" in r and key not in seen:
            seen.add(key)
            rows.append({"name": r["name"], "fold": r["scale_fold"], "alpha": r["scale_alpha"],
                         "stat": r["scale_stat"],
                         "error": r["scale_error"], "error_unscaled": r["scale_error_unscaled"]})
    return rows
