"""One check for the models quantsink can run: layout, layer kinds and attention routing.

:func:`check_supported` refuses, with one line naming the problem and the supported
families, a model whose decoder layers are not where :func:`~quantsink.hf.arch.decoder_layers`
looks, whose attention is not causal or has an unknown layer type, or whose attention
ignores transformers' ``AttentionInterface`` (Falcon): the calibration attention, the
sequential quantizer and the sink cache all rely on these.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantsink.hf.arch import attention_specs
from quantsink.hf.attention import custom_attention

PROBE = "quantsink_probe"


def _probe(module: nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the probe attention is never called")  # only registered, never run


def check_supported(model: nn.Module) -> None:
    """One line (:class:`~quantsink.errors.QuantsinkError`) unless quantsink can run ``model``.

    transformers' own log line about a model that ignores the attention switch (Falcon) is
    silenced: the error says it.
    """
    from transformers.utils import logging as hf_logging

    attention_specs(model)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with custom_attention(model, PROBE, _probe):
            pass
    finally:
        hf_logging.set_verbosity(level)


@torch.no_grad()
def applies_softcap(model: nn.Module) -> bool:
    """Whether the model's attention implementation applies the logit softcap its layers pass.

    Gemma 2 passes ``softcap`` to every attention call; eager (and flash / flex) attention
    apply it, transformers' sdpa silently drops it. This runs the model's own attention
    function on a few random tokens with and without the softcap and compares. False for
    models without softcapping.
    """
    from quantsink.hf.arch import attention_module, decoder_layers, text_config
    from quantsink.hf.attention import _base_attention, base_implementation

    specs = [s for s in attention_specs(model) if s.softcap is not None]
    if not specs:
        return False
    cfg, attn = text_config(model), attention_module(decoder_layers(model)[1][specs[0].layer], specs[0].layer)
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    gen = torch.Generator().manual_seed(0)
    param = next(model.parameters())
    q, k, v = (4 * torch.randn(1, h, 4, dim, generator=gen).to(param) for h in (heads, kv, kv))
    fn = _base_attention(attn, base_implementation(model))
    capped = fn(attn, q, k, v, None, scaling=1.0, dropout=0.0, softcap=0.5)[0]
    plain = fn(attn, q, k, v, None, scaling=1.0, dropout=0.0)[0]
    return not torch.allclose(capped, plain)
