"""Layer-by-layer quantization of a decoder's Linear layers and MoE experts.

The model runs once on the calibration windows (:func:`quantsink.hf.capture.layer_by_layer`);
just before each decoder layer runs, with the arguments the model gives it (its own mask,
rotary table and extras, by layer type) and the hidden states produced by the
already-quantized layers before it, the layer is run once more while hooks record, per
distinct input tensor, the input absmax and (for GPTQ) ``H = X^T X / tokens``; experts
modules are observed expert by expert (:mod:`quantsink.weights.expert_stats`). Linear
layers that read the same tensor (q/k/v, gate/up) form one group: they share the Hessian
and the outlier channels, and are quantized as one stacked matrix. The model's forward then
runs the quantized layer, whose output the next layer receives. What is quantized is decided up front by :func:`quantsink.weights.coverage.layer_plan`
(routers stay in floating point; an unknown matrix layout is refused with one line).
A :class:`LayerStore` (streamed quantization, :mod:`quantsink.weights.streaming`) brings each
layer in from disk just before it is visited, keeps what was quantized, and may hand back a
layer finished by an earlier run instead (it is not quantized again).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from quantsink.errors import check
from quantsink.hf.arch import decoder_layers
from quantsink.hf.capture import LayerCall, layer_by_layer
from quantsink.weights.coverage import check_quantizable
from quantsink.weights.expert_stats import ExpertsObserver
from quantsink.weights.groups import InputGroup


class LayerStore(Protocol):
    """Where the layers of a streamed quantization come from and go to."""

    def begin(self, i: int, layer: nn.Module) -> list[dict] | None:
        """Make layer ``i`` usable; its reports when an earlier run finished it (then it holds
        the quantized tensors and is not quantized again), else None (float weights)."""

    def end(self, i: int, layer: nn.Module, reports: list[dict]) -> None:
        """Layer ``i`` has just been quantized (the model runs it next)."""

    def close(self) -> None:
        """The layer loop is over."""


@torch.no_grad()
def collect_groups(layer: nn.Module, hidden: torch.Tensor, call: LayerCall, hessian: bool,
                   linears: list[str] | None = None, experts: list[str] | None = None
                   ) -> tuple[list[InputGroup], dict[str, Any]]:
    """Run ``layer`` once with its own ``call``; group its Linear layers (all of them, or
    ``linears``) by input tensor, and observe its ``experts`` modules.

    Returns ``(groups, {experts name: ExpertsObserver})``.
    """
    groups: dict[tuple, InputGroup] = {}
    alive: list[torch.Tensor] = []  # keeps inputs alive so that no address is reused in this pass

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            alive.append(x)
            if key in groups:
                groups[key].names.append(name)
                return
            x2 = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
            h = (x2.T @ x2) / x2.shape[0] if hessian else None
            groups[key] = InputGroup([name], x2.abs().amax(0), h, x2.shape[0], mean_abs=x2.abs().mean(0))
        return hook

    if linears is None:
        linears = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    handles = [layer.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in linears]
    observers = {n: ExpertsObserver(layer.get_submodule(n), n, hessian) for n in experts or []}
    for obs in observers.values():
        handles += obs.attach()
    try:
        call.run(layer, hidden)
    finally:
        for h in handles:
            h.remove()
    return list(groups.values()), observers


def _planned(groups: list[InputGroup], linears: list[str]) -> list[InputGroup]:
    """Groups restricted to the planned Linear layers (routers are left out)."""
    keep = set(linears)
    for g in groups:
        g.names = [n for n in g.names if n in keep]
    return [g for g in groups if g.names]


def quantize_layers(model: nn.Module, windows: torch.Tensor | None, quantize_group: Any,
                    static_stats: Any = None, hessian: bool = True, progress: bool = True,
                    quantize_experts: Any = None, prepare_layer: Any = None,
                    store: LayerStore | None = None) -> list[dict]:
    """Quantize every decoder layer in order; returns the per-module reports.

    ``quantize_group(layer, prefix, group) -> list[dict]`` replaces a group's Linear layers;
    ``quantize_experts(layer, prefix, name, observer) -> list[dict]`` an experts module.
    Without ``windows``, ``static_stats(prefix, layer) -> list[InputGroup]`` supplies the
    statistics instead (one group per Linear, no Hessian), experts get no observer, and no
    forward pass runs. ``prepare_layer(layer, prefix, groups, hidden, call)`` (needs ``windows``)
    may rewrite a layer's float weights and its groups' statistics before any group is quantized
    (the AWQ-style scale search of :mod:`quantsink.weights.scale_search`). ``store``: see
    :class:`LayerStore`.
    """
    prefix, layers = decoder_layers(model)
    plans = check_quantizable(model)  # refuse before any work
    check(prepare_layer is None or windows is not None,
          "weights.scale_search needs calibration windows; allowed: --calib PATH (or calib=...)")
    check(quantize_experts is not None or not any(p.experts for p in plans),
          f"{type(model).__name__} has MoE experts but no experts quantizer was given")
    reports: list[dict] = []
    bar = tqdm(total=len(layers), desc="quantize", unit="layer", disable=not progress)

    def quantize(i: int, hidden: torch.Tensor | None, call: LayerCall | None) -> None:
        layer, plan, name = layers[i], plans[i], f"{prefix}.{i}"
        done = None if store is None else store.begin(i, layer)
        if done is not None:
            reports.extend(done)
            bar.update(1)
            return
        first = len(reports)
        if hidden is None:
            groups, observers = static_stats(name, layer), {n: None for n in plan.experts}
        else:
            groups, observers = collect_groups(layer, hidden, call, hessian, plan.linears, plan.experts)
        planned = _planned(groups, plan.linears)
        if prepare_layer is not None:
            prepare_layer(layer, name, planned, hidden, call)
        for group in planned:
            reports.extend(quantize_group(layer, name, group))
            group.hessian = None  # [in, in] each: freed as soon as the group is done
        for experts_name, observer in observers.items():
            reports.extend(quantize_experts(layer, name, experts_name, observer))
        if store is not None:
            store.end(i, layer, reports[first:])
        bar.update(1)

    with bar:
        try:
            if windows is None:
                for i in range(len(layers)):
                    quantize(i, None, None)
            else:  # the model's own forward runs each freshly quantized layer, with its own arguments
                layer_by_layer(model, windows, quantize)
        finally:
            if store is not None:
                store.close()
    return reports
