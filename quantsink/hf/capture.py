"""Each decoder layer's own call, as the unmodified model makes it.

A decoder stack hands every layer arguments of its own: hybrid models pass a sliding-window
mask to sliding layers and a causal one to global layers (Gemma 2/3, GPT-OSS, Mistral-style
configs), Gemma 3 passes the local or the global rotary table by layer type, and a model may
pass any per-layer extra. :func:`layer_by_layer` runs the model once on the calibration
windows with a forward pre-hook on every decoder layer that hands the layer's hidden states
and the rest of its call (:class:`LayerCall`) to a callback before the layer runs; the
callback may quantize the layer (and run it itself, :meth:`LayerCall.run`), and the model
then runs the new layer with its own arguments, so the next layer receives the hidden
states of the already-quantized layers and, always, the arguments the model gives it.
:func:`capture_layer_calls` just records the calls (tensors by reference).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from quantsink.errors import check
from quantsink.hf.arch import SUPPORTED_FAMILIES, decoder_layers, model_device
from quantsink.hf.forward import CACHE_NAMES


class _Captured(Exception):
    """Raised after the last decoder layer: everything needed has been recorded."""


@dataclass
class LayerCall:
    """The arguments of one decoder-layer call, the hidden states left out.

    ``hidden_name`` is None when the hidden states were the first positional argument,
    else the keyword that carried them.
    """

    args: tuple  # positional arguments after the hidden states
    kwargs: dict
    hidden_name: str | None = None

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``layer`` called exactly as the model called it, on ``hidden`` ``[N, L, H]``."""
        if self.hidden_name is None:
            out = layer(hidden, *self.args, **self.kwargs)
        else:
            out = layer(*self.args, **{self.hidden_name: hidden}, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


def _first_parameter(layer: nn.Module) -> str:
    params = list(inspect.signature(type(layer).forward).parameters)
    return params[1] if len(params) > 1 else "hidden_states"


def _split(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, LayerCall]:
    """(hidden states, the rest of the call) of one pre-hook invocation."""
    if args:
        return args[0], LayerCall(tuple(args[1:]), dict(kwargs))
    name = _first_parameter(layer)
    check(name in kwargs, f"{type(layer).__name__} was called without its {name!r} argument; "
                          f"supported: {SUPPORTED_FAMILIES}")
    rest = {k: v for k, v in kwargs.items() if k != name}
    return kwargs[name], LayerCall((), rest, name)


class _Visitor:
    """The pre-hooks of :func:`layer_by_layer`: hand each layer's call to ``visit`` once."""

    def __init__(self, visit: Callable[[int, torch.Tensor, LayerCall], None], n: int) -> None:
        self.visit, self.seen, self.busy = visit, [0] * n, False

    def hook(self, i: int) -> Callable:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.busy:  # visit() running the layer itself
                return
            hidden, call = _split(module, args, kwargs)
            self.seen[i] += 1
            _check_call(i, call)
            self.busy = True
            try:
                self.visit(i, hidden, call)
            finally:
                self.busy = False
        return pre_hook

    def stop(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.busy:
            raise _Captured


@torch.no_grad()
def layer_by_layer(model: nn.Module, input_ids: torch.Tensor,
                   visit: Callable[[int, torch.Tensor, LayerCall], None]) -> None:
    """Run the model once on ``input_ids`` ``[N, L]`` (no cache), calling ``visit(i, hidden,
    call)`` just before decoder layer ``i`` runs, with the hidden states ``[N, L, H]`` and the
    rest of the call the model makes.

    ``visit`` may replace layer ``i``'s submodules (e.g. by quantized ones) and run the layer
    itself (re-entrant calls are not visited): the model then calls the new layer with its own
    arguments, and its output is what the next layer receives. The pass stops after the last
    decoder layer (no final norm, no LM head).
    """
    _, layers = decoder_layers(model)
    visitor = _Visitor(visit, len(layers))
    handles = [layer.register_forward_pre_hook(visitor.hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(visitor.stop))
    try:
        model(input_ids=input_ids.to(model_device(model)), use_cache=False)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    bad = [i for i, n in enumerate(visitor.seen) if n != 1]
    check(not bad, f"{type(model).__name__}: decoder layers {bad} were not called exactly once per "
                   f"forward; supported: {SUPPORTED_FAMILIES}")


def _check_call(i: int, call: LayerCall) -> None:
    held = [n for n in CACHE_NAMES if call.kwargs.get(n) is not None]
    check(not held, f"decoder layer {i} received a cache ({held}) with use_cache=False; "
                    f"supported: {SUPPORTED_FAMILIES}")


@torch.no_grad()
def capture_layer_calls(model: nn.Module, input_ids: torch.Tensor
                        ) -> tuple[torch.Tensor, list[LayerCall]]:
    """Hidden states ``[N, L, H]`` entering decoder layer 0, and every layer's own call
    (one pass of the unmodified model, see :func:`layer_by_layer`)."""
    first: list[torch.Tensor] = []
    calls: list[LayerCall] = []

    def visit(i: int, hidden: torch.Tensor, call: LayerCall) -> None:
        if i == 0:
            first.append(hidden)
        calls.append(call)

    layer_by_layer(model, input_ids, visit)
    return first[0], calls


def same_call(a: Any, b: Any) -> float:
    """Largest absolute difference between two call structures (inf when they differ in kind).

    Tensors are compared element-wise (boolean masks as 0/1), tuples/lists/dicts recursively,
    anything else by equality.
    """
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return float("inf")
        return 0.0 if a.numel() == 0 else float((a.double() - b.double()).abs().max())
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if len(a) != len(b):
            return float("inf")
        return max([same_call(x, y) for x, y in zip(a, b)], default=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max([same_call(a[k], b[k]) for k in a], default=0.0)
    return 0.0 if a == b else float("inf")
