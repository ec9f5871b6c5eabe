"""The arguments of a forward call, and the sink cache of the forward that is running.

transformers renamed the cache argument: ``generate`` passes it as ``cache=`` since 5.24 (and
``past_key_values=`` before; the old name stays a deprecated alias until 5.40). Nothing in
quantsink names either keyword: :func:`call_arguments` binds the module's forward signature
and looks under both names.

Attention functions receive neither the cache nor the input ids, so :func:`install_hooks`
puts a forward pre-hook and a forward hook on the decoder stack (the module that owns the
decoder layers, so that ``model(...)`` and ``model.model(...)`` are both seen). The pre-hook
hands the decoder stack, the call's ``input_ids`` and 2-D ``attention_mask`` to a cache that
wants them (``begin_forward``) and publishes it in a context variable for the attention function; the
forward hook closes the forward (``end_forward``). Hooks are plain module-level functions,
so a ``copy.deepcopy`` of the model carries them.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
from typing import Any

import torch
from torch import nn

CACHE_NAMES = ("cache", "past_key_values")
_STACK: contextvars.ContextVar[tuple] = contextvars.ContextVar("quantsink_active_cache", default=())


@functools.lru_cache(maxsize=64)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The named arguments of ``module(*args, **kwargs)``, ``**kwargs`` extras merged in."""
    try:
        bound = _signature(type(module)).bind_partial(module, *args, **kwargs)
    except TypeError:  # not a call this signature accepts: let forward raise its own error
        return dict(kwargs)
    named = dict(bound.arguments)
    named.pop(next(iter(_signature(type(module)).parameters)), None)  # self
    for p in _signature(type(module)).parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(p.name, {}) or {})
    return named


def cache_argument(named: dict[str, Any]) -> Any:
    """The cache among bound call arguments, under its new or its deprecated name."""
    for name in CACHE_NAMES:
        if named.get(name) is not None:
            return named[name]
    return None


def cache_keyword(model: nn.Module) -> str:
    """The keyword this transformers version's ``generate`` / ``forward`` expects for the cache."""
    params = _signature(type(model)).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, as ``model``'s forward expects."""
    return {cache_keyword(model): cache}


def active_cache() -> Any:
    """The cache (one with ``begin_forward``) of the forward that is running, or None."""
    stack = _STACK.get()
    return stack[-1] if stack else None


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    named = call_arguments(module, args, kwargs)
    cache = cache_argument(named)
    if not hasattr(cache, "begin_forward"):
        cache = None
    if cache is not None:
        ids = named.get("input_ids")
        cache.begin_forward(module, ids if isinstance(ids, torch.Tensor) else None,
                            named.get("attention_mask"), has_embeds=named.get("inputs_embeds") is not None)
    _STACK.set(_STACK.get() + (cache,))


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    stack = _STACK.get()
    if not stack:
        return
    _STACK.set(stack[:-1])
    if stack[-1] is not None:
        stack[-1].end_forward()


def install_hooks(stack: nn.Module) -> None:
    """Put the cache hooks on the decoder stack once (idempotent, survives deepcopy)."""
    if any(h is _pre_hook for h in stack._forward_pre_hooks.values()):
        return
    stack.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    stack.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
