"""Hooking :class:`~quantsink.kv.cache.SinkQuantCache` into a transformers model.

transformers does not pass the Cache to attention functions, so :func:`attach`:

1. registers the attention function ``"quantsink"`` (:func:`sink_attention`) and a mask
   function that hands the 2-D padding mask through unchanged, and switches the model to it;
2. adds forward hooks on the model that publish the ``past_key_values`` of the running
   forward in a context variable (and its 2-D ``attention_mask`` for left padding), and
   clear it afterwards.

When the running cache is not a SinkQuantCache (e.g. a DynamicCache), :func:`sink_attention`
falls back to plain SDPA, so an attached model keeps working with any cache.
"""
from __future__ import annotations

import contextvars
from typing import Any

import torch

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("quantsink_cache", default=None)
NAME = "quantsink"


def active_cache() -> Any:
    """The SinkQuantCache of the forward pass that is running, or None."""
    return _ACTIVE.get()


def sink_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                   dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: returns ``(out [B, L, Hq, D], None)``."""
    cache = _ACTIVE.get()
    layer_idx = getattr(module, "layer_idx", None)
    if cache is not None and layer_idx is not None and cache.layers[layer_idx].step is not None:
        out = cache.attend(layer_idx, query, scaling)
    else:
        out = _sdpa(query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    """Causal SDPA with an optional 2-D padding mask (fallback for other caches)."""
    L, S = q.shape[2], k.shape[2]
    mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)[None, None]
    if pad is not None and pad.dim() == 2:
        mask = mask & pad[:, -S:].bool()[:, None, None, :]
    elif pad is not None:  # an already prepared 4-D mask
        mask = pad.bool() if pad.dtype == torch.bool else pad == 0
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                  kv_offset: int = 0, mask_function: Any = None,
                  attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """Mask function: pass the 2-D padding mask (True = real token) through, or None."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


def register() -> None:
    """Register the ``quantsink`` attention and mask functions (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sink_attention)
    AttentionMaskInterface.register(NAME, _padding_mask)


def attach(model: torch.nn.Module) -> None:
    """Switch ``model`` to the quantsink attention and install the cache hooks (once)."""
    register()
    model.set_attn_implementation(NAME)
    if getattr(model, "_quantsink_hooks", None) is not None:
        return
    tokens: list = []

    def pre(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        from quantsink.kv.cache import SinkQuantCache

        cache = kwargs.get("past_key_values")
        if isinstance(cache, SinkQuantCache):
            cache.set_padding(kwargs.get("attention_mask"))
            cache.observe_tokens(kwargs.get("input_ids", args[0] if args else None))
            tokens.append(_ACTIVE.set(cache))
        else:
            tokens.append(_ACTIVE.set(None))

    def post(mod: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if tokens:
            _ACTIVE.reset(tokens.pop())

    model._quantsink_hooks = (model.register_forward_pre_hook(pre, with_kwargs=True),
                              model.register_forward_hook(post, with_kwargs=True, always_call=True))
