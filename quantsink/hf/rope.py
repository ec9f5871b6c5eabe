"""Moving RoPE'd queries back by a number of positions with the model's own rotary embedding.

StreamingLLM evicts old tokens but keeps the sinks; the sinks are then attended as if the
evicted tokens never existed, i.e. with the query rotated back by the evicted count:
``R(p - s) q0 = R(-s) R(p) q0``. That identity holds for rotary embeddings with a fixed
frequency table (``default``, ``linear``, ``llama3``, ``yarn``); :class:`RopeShift` builds
``R(-s)`` from the layer's own rotary module (per layer type, e.g. Gemma 3's local and
global tables) and applies it with the layer's own ``apply_rotary_pos_emb`` (interleaved
for Cohere, partial for models that rotate part of head_dim). It checks the identity
numerically once and refuses with one line where it does not hold.
"""
from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from quantsink.errors import QuantsinkError, check
from quantsink.hf.arch import attention_module, decoder_layers, decoder_stack, layer_types

EXACT_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class RopeShift:
    """``shift(q, s)``: queries ``q: [B, H, L, D]`` at position ``p`` moved to ``p - s[l]``."""

    def __init__(self, model: nn.Module, layer: int) -> None:
        stack, name = decoder_stack(model), type(model).__name__
        self.rotary = getattr(stack, "rotary_emb", None)
        check(isinstance(self.rotary, nn.Module),
              f"{name} has no rotary embedding (rotary_emb); StreamingLLM mode (max_cache_tokens) needs RoPE")
        attn = attention_module(decoder_layers(model)[1][layer], layer)
        self.apply = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        check(callable(self.apply), f"{name}: no apply_rotary_pos_emb next to {type(attn).__name__}; "
                                    "StreamingLLM mode needs it")
        self.layer_type = layer_types(model)[layer]
        self.typed = "layer_type" in inspect.signature(self.rotary.forward).parameters
        rope_type = getattr(self.rotary, "rope_type", "default")
        rope_type = rope_type.get(self.layer_type) if isinstance(rope_type, dict) else rope_type
        check(rope_type in EXACT_ROPE_TYPES,
              f"{name}: rope_type {rope_type!r} depends on the sequence length, so StreamingLLM's shift "
              f"cannot be exact; allowed: {list(EXACT_ROPE_TYPES)}, or max_cache_tokens: null")
        scale = (getattr(self.rotary, f"{self.layer_type}_attention_scaling", None) if self.typed
                 else getattr(self.rotary, "attention_scaling", None))
        self.scale = 1.0 if scale is None else float(scale)
        self._self_check(model.config, name)

    def _cos_sin(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = positions.to(like.device).long()[None]  # [1, L]
        args = (like, pos, self.layer_type) if self.typed else (like, pos)
        cos, sin = self.rotary(*args)  # [1, L, D_rot], scaled by attention_scaling
        return cos / self.scale, sin / self.scale

    def rotate(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``q: [B, H, L, D]`` rotated by the (unscaled) rotation of ``positions: [L]``."""
        cos, sin = self._cos_sin(q, positions)
        return self.apply(q, q, cos, sin)[0]

    def __call__(self, q: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.rotate(q, -shift)

    def _self_check(self, config: object, name: str) -> None:
        head_dim = getattr(config.get_text_config(), "head_dim", None) or (
            config.get_text_config().hidden_size // config.get_text_config().num_attention_heads)
        gen = torch.Generator().manual_seed(0)
        q0 = torch.randn(1, 1, 3, head_dim, generator=gen, dtype=torch.float32)
        pos, shift = torch.tensor([5, 40, 300]), torch.tensor([3, 17, 250])
        with torch.no_grad():
            got = self(self.rotate(q0, pos), shift)
            want = self.rotate(q0, pos - shift)
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise QuantsinkError(f"{name}: its rotary embedding does not compose (R(p) R(-s) != R(p - s)), so "
                                 "StreamingLLM's shift cannot be exact; allowed: max_cache_tokens: null")
