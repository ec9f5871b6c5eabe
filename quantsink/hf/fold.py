"""Where a per-input-channel scale can be folded into the op before a Linear group (AWQ).

A scale ``s`` on the input channels of a group of Linear layers (``W -> W diag(s)``) keeps the
model's function when the group's input is divided by ``s`` at its producer:

- ``norm``: a multiplicative norm (``y = normed(x) * weight``, Llama's RMSNorm) whose output is
  read by the group only: ``weight / s``. q/k/v after ``input_layernorm``, gate/up after
  ``post_attention_layernorm``;
- ``rows``: a Linear whose output rows feed the group through an elementwise-linear path:
  ``v_proj`` rows for ``o_proj`` (attention output is a convex mix of values per head; with GQA a
  value head serves ``repeat`` query heads, so the scale is shared by them) and ``up_proj`` rows for
  ``down_proj`` (``act(gate) * up``): rows and bias ``/ s``.

Only Llama-style layers are accepted (:func:`check_foldable`): Gemma's ``1 + weight`` norms, post-norm
layers (OLMo 2, Gemma's extra norms), fused projections (Phi-3), parallel blocks (Cohere), and MoE
MLPs (whose router reads the same norm output) are refused with one line, before any work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantsink.errors import check
from quantsink.hf.arch import decoder_layers, head_dim, text_config

FOLDABLE = "Llama, Qwen2, Qwen3, Mistral, Granite (Llama-style decoder layers)"
_REFUSED_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


@dataclass(frozen=True)
class FoldSite:
    """One group of Linear layers (names relative to the decoder layer) and its producer."""

    consumers: tuple[str, ...]
    producer: str  # a norm module or a Linear, relative to the decoder layer
    kind: str  # "norm" or "rows"
    repeat: int = 1  # rows: query heads per value head (the consumer's scale repeats per group)
    block: int = 1  # rows: channels per head (head_dim) when repeat > 1


def _linear(layer: nn.Module, name: str) -> bool:
    try:
        return isinstance(layer.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


def fold_sites(model: nn.Module, layer: nn.Module) -> list[FoldSite]:
    """The four fold sites of a Llama-style decoder layer (call :func:`check_foldable` first)."""
    cfg = text_config(model)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    a, m = "self_attn", "mlp"
    return [FoldSite((f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"), "input_layernorm", "norm"),
            FoldSite((f"{a}.o_proj",), f"{a}.v_proj", "rows", heads // kv, head_dim(model)),
            FoldSite((f"{m}.gate_proj", f"{m}.up_proj"), "post_attention_layernorm", "norm"),
            FoldSite((f"{m}.down_proj",), f"{m}.up_proj", "rows")]


def norm_is_multiplicative(norm: nn.Module, width: int) -> bool:
    """True when ``norm(x)`` with ``weight * c`` equals ``c * norm(x)`` per channel and it has no bias."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (width,) or getattr(norm, "bias", None) is not None:
        return False
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0)).to(w)
    c = torch.linspace(0.5, 2.0, width).to(w)
    with torch.no_grad():
        ref = norm(x)
        saved = w.detach().clone()
        w.mul_(c)
        try:
            got = norm(x)
        finally:
            w.copy_(saved)
    return bool(torch.allclose(got, ref * c, rtol=1e-4, atol=1e-5))


def _layer_problem(model: nn.Module, layer: nn.Module) -> str | None:
    """Why ``layer`` is not foldable (None when it is)."""
    cfg = text_config(model)
    for name in _REFUSED_NORMS:
        if getattr(layer, name, None) is not None:
            return f"it has a {name} (the MLP input is not post_attention_layernorm's output)"
    for site in fold_sites(model, layer):
        for name in (*site.consumers, *([site.producer] if site.kind == "rows" else [])):
            if not _linear(layer, name):
                return f"it has no nn.Linear {name}"
        if site.kind == "norm":
            norm = getattr(layer, site.producer, None)
            if norm is None:
                return f"it has no {site.producer}"
            if not norm_is_multiplicative(norm, int(cfg.hidden_size)):
                return (f"its {site.producer} ({type(norm).__name__}) is not y = normed(x) * weight "
                        "without bias (e.g. Gemma's 1 + weight)")
    return None


def check_foldable(model: nn.Module) -> None:
    """One-line error unless every decoder layer has the four Llama-style fold sites."""
    _, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        why = _layer_problem(model, layer)
        check(why is None, f"weights.scale_search cannot fold scales into {type(model).__name__} "
                           f"decoder layer {i}: {why}; allowed: {FOLDABLE}, or weights.scale_search: false")
