"""Switching a model's attention to quantsink's, and checking that the switch took.

:func:`switch` registers ``quantsink_<base>`` (``base``: the implementation the model used,
e.g. ``sdpa`` or ``eager``) as an attention function and a mask function, and sets it on
the model. When the forward's cache is a sink cache (see :mod:`quantsink.hf.forward`), the
attention function hands the layer's queries to ``cache.attend`` with the layer's extras
(:class:`Extras`); otherwise it calls the base implementation with exactly the arguments it
got, and the mask function builds exactly the base mask, so a model that was switched and
runs with any other cache computes what it computed before. Models whose attention ignores
``set_attn_implementation`` (Falcon) are refused with one line.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from quantsink.errors import QuantsinkError, check
from quantsink.hf import forward
from quantsink.hf.arch import SUPPORTED_FAMILIES, check_causal_decoder, text_config

PREFIX = "quantsink_"
# kwargs that attention functions receive and that do not change the attention's result
_HARMLESS = {"position_ids", "use_cache", "output_attentions", "cache_position", "output_router_logits",
             "position_embeddings", "layer_idx"}


@dataclass(frozen=True)
class Extras:
    """Per-call attention settings beyond q, k, v: what the layer asked for."""

    scaling: float
    sliding_window: int | None = None
    sink_logits: torch.Tensor | None = None  # [Hq] learned sinks (GPT-OSS ``s_aux``)
    softcap: float | None = None


def extras_from_call(module: nn.Module, query: torch.Tensor, kwargs: dict) -> Extras:
    """The :class:`Extras` of one attention call; one line for what quantsink cannot honour."""
    unknown = sorted(k for k, v in kwargs.items()
                     if k not in _HARMLESS | {"scaling", "dropout", "sliding_window", "s_aux", "softcap",
                                              "is_causal"} and v is not None)
    check(not unknown, f"{type(module).__name__} passes attention argument(s) {unknown} that quantsink's "
                       f"attention does not implement; supported: {SUPPORTED_FAMILIES}")
    check(not kwargs.get("dropout"), f"{type(module).__name__}: attention dropout "
                                     f"{kwargs.get('dropout')} is not supported; allowed: 0 (eval mode)")
    check(kwargs.get("is_causal", True) is not False, "non-causal attention is not supported by quantsink")
    scaling = kwargs.get("scaling")
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    return Extras(scaling, None if window is None else int(window), kwargs.get("s_aux"),
                  None if softcap is None else float(softcap))


def _base_attention(module: nn.Module, base: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if base == "eager":
        check(eager is not None, f"{type(module).__name__}: no eager_attention_forward in its module")
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(base, eager)


def _attention_for(base: str) -> Callable:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = forward.active_cache()
        if cache is None:
            return _base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)
        out = cache.attend(module.layer_idx, query, extras_from_call(module, query, kwargs))  # [B, Hq, L, D]
        return out.transpose(1, 2).contiguous(), None
    attention.__name__ = f"{PREFIX}{base}_attention"
    return attention


def _mask_for(base: str) -> Callable:
    def mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
        if forward.active_cache() is None:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, **kwargs)
        return None  # the sink cache builds its own masks from positions and the padding it saw
    mask.__name__ = f"{PREFIX}{base}_mask"
    return mask


def register(base: str) -> str:
    """Register ``quantsink_<base>`` (attention and mask function); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    check(base in ALL_MASK_ATTENTION_FUNCTIONS, f"attention implementation {base!r} has no mask function; "
                                                f"allowed: {sorted(ALL_MASK_ATTENTION_FUNCTIONS)}")
    name = PREFIX + base
    AttentionInterface.register(name, _attention_for(base))
    AttentionMaskInterface.register(name, _mask_for(base))
    return name


def base_implementation(model: nn.Module) -> str:
    """The implementation the model uses, or used before :func:`switch`."""
    current = text_config(model)._attn_implementation or "eager"
    return current[len(PREFIX):] if current.startswith(PREFIX) else current


def _refuse(model: nn.Module) -> QuantsinkError:
    return QuantsinkError(f"{type(model).__name__} does not route its attention through transformers' "
                          f"AttentionInterface, so quantsink cannot run it; supported: {SUPPORTED_FAMILIES}")


def set_checked(model: nn.Module, name: str) -> None:
    """``model.set_attn_implementation(name)``, then verify every attention module follows it."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise _refuse(model)
    model.set_attn_implementation(name)
    configs = {id(m.config): m.config for m in model.modules()
               if hasattr(m, "layer_idx") and hasattr(getattr(m, "config", None), "_attn_implementation")}
    took = text_config(model)._attn_implementation == name and all(
        c._attn_implementation == name for c in configs.values())
    if not took:
        raise _refuse(model)


def switch(model: nn.Module) -> None:
    """Switch ``model`` to quantsink's attention over its current base and install the hooks."""
    from quantsink.hf.arch import attention_specs, decoder_stack

    check_causal_decoder(model)
    attention_specs(model)  # one line for unsupported layouts or layer types
    name = register(base_implementation(model))
    if text_config(model)._attn_implementation != name:
        set_checked(model, name)
    forward.install_hooks(decoder_stack(model))


def restore(model: nn.Module) -> None:
    """Put the model back on its base implementation (a no-op if it was never switched)."""
    base = base_implementation(model)
    if text_config(model)._attn_implementation != base:
        model.set_attn_implementation(base)


@contextlib.contextmanager
def custom_attention(model: nn.Module, name: str, fn: Callable, mask: str = "eager") -> Iterator[None]:
    """Run ``model`` with attention function ``fn`` (registered as ``name``, with the ``mask``
    implementation's mask function), checked like :func:`switch`; restored on exit.

    ``fn(module, query, key, value, attention_mask, **kwargs) -> (out [B, L, Hq, D], None)``
    receives the layer's extras as keyword arguments (see :func:`extras_from_call`).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask])
    original = text_config(model)._attn_implementation
    set_checked(model, name)
    try:
        yield
    finally:
        model.set_attn_implementation(original)
