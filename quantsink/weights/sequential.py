"""Layer-by-layer quantization of a decoder's Linear layers.

The calibration windows are embedded once; then, for each decoder layer in turn, the layer
runs on the hidden states produced by the already-quantized layers before it while hooks
record, per distinct input tensor, the input absmax and (for GPTQ) ``H = X^T X / tokens``.
Linear layers that read the same tensor (q/k/v, gate/up) form one group: they share the
Hessian and the outlier channels, and are quantized as one stacked matrix. The quantized
layer then runs again to produce the next layer's inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from quantsink.errors import check


@dataclass
class InputGroup:
    """Linear layers (names relative to their decoder layer) that read the same input."""

    names: list[str]
    absmax: torch.Tensor  # [in] float32
    hessian: torch.Tensor | None = None  # [in, in] float32, X^T X / tokens
    tokens: int = 0
    extra: dict = field(default_factory=dict)


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are known."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, ModuleList)`` of the decoder layers (``model.model.layers`` for Llama)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    check(isinstance(layers, nn.ModuleList),
          f"{type(model).__name__} has no model.layers; allowed: Llama-style decoder models")
    name = next(n for n, m in model.named_modules() if m is layers)
    return name, layers


@torch.no_grad()
def capture_inputs(model: nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states ``[N, L, H]`` entering the first decoder layer, and its keyword arguments."""
    _, layers = decoder_layers(model)
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = kwargs
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(windows.to(model.device), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in seen["kwargs"].items() if k not in ("past_key_values", "use_cache")}
    return seen["hidden"], kwargs


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer's output hidden states ``[N, L, H]``."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def collect_groups(layer: nn.Module, hidden: torch.Tensor, kwargs: dict,
                   hessian: bool) -> list[InputGroup]:
    """Run ``layer`` once and group its Linear layers by input tensor, with their statistics."""
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
            groups[key] = InputGroup([name], x2.abs().amax(0), h, x2.shape[0])
        return hook

    linears = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linears]
    try:
        run_layer(layer, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    return list(groups.values())


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace ``root.<name>`` (a dotted path) by ``module``."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def quantize_layers(model: nn.Module, windows: torch.Tensor | None, quantize_group: Any,
                    static_stats: Any = None, hessian: bool = True,
                    progress: bool = True) -> list[dict]:
    """Quantize every decoder layer in order; returns the per-module reports.

    ``quantize_group(layer, prefix, group) -> list[dict]`` replaces a group's Linear layers.
    Without ``windows``, ``static_stats(prefix, layer) -> list[InputGroup]`` supplies the
    statistics instead (one group per Linear, no Hessian) and no forward pass runs.
    """
    prefix, layers = decoder_layers(model)
    hidden, kwargs = capture_inputs(model, windows) if windows is not None else (None, {})
    reports: list[dict] = []
    for i, layer in enumerate(tqdm(layers, desc="quantize", unit="layer", disable=not progress)):
        if hidden is None:
            groups = static_stats(f"{prefix}.{i}", layer)
        else:
            groups = collect_groups(layer, hidden, kwargs, hessian)
        for group in groups:
            reports += quantize_group(layer, f"{prefix}.{i}", group)
        if hidden is not None and i + 1 < len(layers):
            with torch.no_grad():
                hidden = run_layer(layer, hidden, kwargs)
    return reports
