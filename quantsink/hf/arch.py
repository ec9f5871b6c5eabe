"""What a transformers decoder is made of: its layers, attention modules and attention kinds.

Supported models are decoder-only causal LMs whose attention goes through transformers'
``AttentionInterface`` and whose decoder layers sit at one of :data:`LAYER_PATHS`. Every
layer's attention kind comes from ``config.layer_types`` (or, without it, from
``config.sliding_window``, as transformers infers it): ``full_attention`` or
``sliding_attention`` (query ``q`` sees keys ``q - window < k <= q``). Learned sink logits
(GPT-OSS's per-head ``sinks``) and attention-logit softcapping (Gemma 2) are read from the
attention module and the config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantsink.errors import QuantsinkError, check

SUPPORTED_FAMILIES = ("Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3, OLMo 2, GPT-OSS, Cohere, "
                      "Granite, Falcon without ALiBi (decoder-only models whose attention goes through "
                      "transformers' AttentionInterface, as Falcon's does from transformers 5.25)")
LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers",
               "transformer.h")
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
KINDS = {"full_attention": "full", "sliding_attention": "sliding"}


@dataclass(frozen=True)
class AttentionSpec:
    """How one decoder layer attends."""

    layer: int
    kind: str  # "full" or "sliding"
    sliding_window: int | None  # sliding layers: query q sees keys q - window < k <= q
    learned_sinks: bool  # a per-head sink logit joins the softmax denominator (GPT-OSS)
    softcap: float | None  # scores become softcap * tanh(scores / softcap) (Gemma 2)


def text_config(model: nn.Module) -> Any:
    """The decoder's config (the text config of a multimodal model)."""
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _resolve(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, ModuleList)`` of the decoder layers, e.g. ``("model.layers", ...)``."""
    for path in LAYER_PATHS:
        layers = _resolve(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise QuantsinkError(f"{type(model).__name__}: no decoder layers at {', '.join(LAYER_PATHS)}; "
                         f"supported: {SUPPORTED_FAMILIES}")


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes: its first tensor not on the meta device (a streamed model keeps
    the modules it is not running there)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return t.device
    return next(model.parameters()).device


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers (it receives the cache of every forward)."""
    path, _ = decoder_layers(model)
    parent = path.rpartition(".")[0]
    return _resolve(model, parent) if parent else model


def attention_module(layer: nn.Module, index: int) -> nn.Module:
    """The self-attention module of decoder layer ``index`` (it carries ``layer_idx``)."""
    for name in ATTENTION_NAMES:
        mod = getattr(layer, name, None)
        if isinstance(mod, nn.Module):
            check(getattr(mod, "layer_idx", index) == index,
                  f"decoder layer {index}: its attention has layer_idx {getattr(mod, 'layer_idx', None)}; "
                  f"supported: {SUPPORTED_FAMILIES}")
            return mod
    raise QuantsinkError(f"decoder layer {index} ({type(layer).__name__}) has no attention module named "
                         f"{'/'.join(ATTENTION_NAMES)}; supported: {SUPPORTED_FAMILIES}")


def learned_sinks(attention: nn.Module) -> torch.Tensor | None:
    """The per-head learned sink logits ``[Hq]`` of an attention module, or None."""
    sinks = getattr(attention, "sinks", None)
    return sinks if isinstance(sinks, torch.Tensor) else None


def head_dim(model: nn.Module) -> int:
    """The attention head size of the decoder."""
    cfg = text_config(model)
    dim = getattr(cfg, "head_dim", None)
    return int(dim) if dim else int(cfg.hidden_size // cfg.num_attention_heads)


def context_length(model: nn.Module) -> int | None:
    """The model's maximum number of positions, when its config says."""
    n = getattr(text_config(model), "max_position_embeddings", None)
    return int(n) if n else None


def layer_types(model: nn.Module) -> list[str]:
    """``full_attention`` / ``sliding_attention`` per decoder layer (one line for anything else)."""
    cfg = text_config(model)
    n = len(decoder_layers(model)[1])
    types = getattr(cfg, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(cfg, "sliding_window", None) is not None else "full_attention"
        types = [kind] * n
    types = list(types)[:n]
    bad = sorted(set(types) - set(KINDS))
    check(not bad, f"{type(model).__name__}: attention layer types {bad} are not supported; allowed: "
                   f"{sorted(KINDS)}")
    return types


def check_causal_decoder(model: nn.Module) -> None:
    """Refuse encoder-decoders and bidirectional attention with one line."""
    cfg = text_config(model)
    name = type(model).__name__
    check(not getattr(model.config, "is_encoder_decoder", False),
          f"{name} is an encoder-decoder model; supported: {SUPPORTED_FAMILIES}")
    check(getattr(cfg, "is_causal", True) and not getattr(cfg, "use_bidirectional_attention", False),
          f"{name} uses bidirectional attention; supported: causal decoders ({SUPPORTED_FAMILIES})")
    # ALiBi (Falcon's config.alibi) adds its position bias into the attention mask, which the sink
    # cache's attention does not read as a bias
    check(not getattr(cfg, "alibi", False), f"{name} uses ALiBi position bias (config.alibi=True), which "
                                            f"quantsink's attention does not apply; supported: {SUPPORTED_FAMILIES}")


def attention_specs(model: nn.Module) -> list[AttentionSpec]:
    """One :class:`AttentionSpec` per decoder layer."""
    check_causal_decoder(model)
    cfg = text_config(model)
    _, layers = decoder_layers(model)
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    specs = []
    for i, (layer, kind) in enumerate(zip(layers, layer_types(model))):
        attn = attention_module(layer, i)
        window = int(cfg.sliding_window) if kind == "sliding_attention" else None
        check(window is None or window >= 1, f"sliding_window must be >= 1, got {window}")
        specs.append(AttentionSpec(i, KINDS[kind], window, learned_sinks(attn) is not None,
                                   None if softcap is None else float(softcap)))
    return specs
