"""``SinkQuantCache``: a transformers Cache with fp16 sinks, a packed int2/4/8 body and an fp16 window.

Usage::

    cache = SinkQuantCache.from_recipe(model, "kv-int4-sink")   # also switches attention
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

Per layer (:class:`~quantsink.kv.layer.SinkQuantLayer`): sink positions (calibrated
SinkMap, default the first ``num_sinks``) in fp16, the body as packed codes with fp16
scale/zero, and the most recent tokens in fp16, flushed into the body ``G`` at a time.

Decode steps go through :func:`quantsink.kv.attention.decode_attention` (torch reference
on CPU, Triton on CUDA); chunks of several tokens (prefill, teacher-forced evaluation,
chunked streaming) through :func:`quantsink.kv.prefill.chunk_attention_ref`, which
reproduces token-by-token decoding exactly. No fp16 copy of the body is kept.

Left padding: sinks are positions in the padded batch. So that every row keeps its own
first ``num_sinks`` real tokens in fp16, the sink set is the union over rows of
``pad_b + s``; a row therefore may keep a few more real tokens in fp16 than others, and
pad positions are masked out everywhere.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from transformers.cache_utils import Cache

from quantsink.errors import QuantsinkError, check
from quantsink.kv import integration
from quantsink.kv.attention import BACKENDS, decode_attention
from quantsink.kv.config import KVConfig
from quantsink.kv.layer import SinkQuantLayer
from quantsink.kv.prefill import chunk_attention_ref
from quantsink.kv.rotation import find_inv_freq, hadamard, rope_shift


class SinkQuantCache(Cache):
    """Sink-aware quantized KV cache (see the module docstring)."""

    def __init__(self, config: KVConfig, num_layers: int, sink_map: Any = None,
                 backend: str = "auto") -> None:
        check(backend in BACKENDS, f"backend {backend!r} is not supported; allowed: {list(BACKENDS)}")
        positional = list(range(config.num_sinks)) if sink_map is None else list(sink_map.positional)
        check(all(p >= 0 for p in positional), f"sink positions must be >= 0, got {positional}")
        if config.max_cache_tokens is not None:
            need = len(positional) + config.window + config.key_group_size
            check(config.max_cache_tokens >= need,
                  f"{len(positional)} sinks + window {config.window} + one key group do not fit in "
                  f"max_cache_tokens={config.max_cache_tokens}; allowed: >= {need}")
        content = list(sink_map.content_token_ids) if sink_map is not None and config.content_sinks else []
        check(not config.content_sinks or content,
              "kv_cache.content_sinks=true needs a calibrated sink map with content-sink token ids "
              "(from `quantsink inspect`); allowed: content_sinks: false without one")
        super().__init__(layers=[SinkQuantLayer(config) for _ in range(num_layers)])
        self.config, self.backend, self.positional = config, backend, sorted(positional)
        self.content_ids = torch.tensor(content, dtype=torch.long)
        self.inv_freq: torch.Tensor | None = None
        self._padding: torch.Tensor | None = None
        self._content_seen: dict[tuple[int, int], int] = {}  # (row, token id) -> occurrences kept
        self._new_sinks: list[int] = []  # content-sink positions of the running forward

    @classmethod
    def from_recipe(cls, model: Any, recipe: Any, sink_map: Any = None,
                    backend: str = "auto") -> "SinkQuantCache":
        """A cache for ``model`` from a Recipe, KVConfig, recipe name/path or dict; attaches it."""
        config = resolve_kv_config(recipe)
        num_layers = model.config.get_text_config().num_hidden_layers
        cache = cls(config, num_layers, sink_map=sink_map, backend=backend)
        cache.attach(model)
        return cache

    def attach(self, model: Any) -> "SinkQuantCache":
        """Switch ``model`` to the quantsink attention (needed before the first forward)."""
        integration.attach(model)
        self.inv_freq = find_inv_freq(model)
        return self

    # -- transformers Cache API ----------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new ``[B, Hkv, L, D]`` keys/values of layer ``layer_idx``."""
        if integration.active_cache() is not self:
            raise QuantsinkError("SinkQuantCache is not attached to this model; create it with "
                                 "SinkQuantCache.from_recipe(model, recipe) or call cache.attach(model)")
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.set_sinks(self._sink_positions())
        if self._new_sinks:
            layer.add_sinks(self._new_sinks)
        if self.config.rotate:
            h = hadamard(key_states.shape[-1], key_states.device, key_states.dtype)
            key_states, value_states = key_states @ h, value_states @ h
        layer.update(key_states, value_states)
        return key_states, value_states

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """The 2-D padding mask of the running forward (True/1 = real token), or None."""
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            self._padding = attention_mask.bool().cpu()
        else:
            self._padding = None

    def observe_tokens(self, input_ids: torch.Tensor | None) -> None:
        """Content sinks: mark this forward's first occurrences of the sink-map token ids.

        Called with the ``[B, L]`` input ids of every forward (after :meth:`set_padding`);
        a position becomes a sink when any real row holds one of its first
        ``content_sink_occurrences`` occurrences of a content-sink id there.
        """
        self._new_sinks = []
        if self.content_ids.numel() == 0 or input_ids is None or input_ids.dim() != 2:
            return
        ids, start = input_ids.cpu(), self.get_seq_length()
        hits = torch.isin(ids, self.content_ids)
        if self._padding is not None:
            hits &= self._padding[:, start:start + ids.shape[1]]
        new = set()
        for b, j in hits.nonzero().tolist():
            key = (b, int(ids[b, j]))
            if self._content_seen.get(key, 0) < self.config.content_sink_occurrences:
                self._content_seen[key] = self._content_seen.get(key, 0) + 1
                new.add(start + j)
        self._new_sinks = sorted(new)

    def reset(self) -> None:
        super().reset()
        self._content_seen, self._new_sinks = {}, []

    def _sink_positions(self) -> list[int]:
        if self._padding is None:
            return self.positional
        pads = (self._padding.long().cumsum(-1) == 0).sum(-1).unique().tolist()  # leading pads per row
        return sorted({p + s for p in pads for s in self.positional})

    # -- attention -----------------------------------------------------------------------
    def attend(self, layer_idx: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention ``[B, Hq, L, D]`` of RoPE'd queries over layer ``layer_idx`` after its update."""
        layer = self.layers[layer_idx]
        q_sink = self._sink_queries(layer, q)
        h = hadamard(q.shape[-1], q.device, q.dtype) if self.config.rotate else None
        if h is not None:
            q = q @ h
            q_sink = q_sink @ h if q_sink is not None else None
        if q.shape[2] == 1:
            layer.finish()  # a decode step sees its own flushes and evictions
            key_mask = self._key_mask(layer)
            body = layer.body_k if layer.body_k is not None and layer.body_k.num_tokens else None
            out = decode_attention(q, layer.sink_k, layer.sink_v, body, layer.body_v if body is not None else None,
                                   layer.win_k, layer.win_v, scale, key_mask=key_mask,
                                   q_sink=q_sink, backend=self.backend)
        else:
            out = chunk_attention_ref(layer, q, scale, pad=self._padding, q_sink=q_sink)
            layer.finish()
        return out @ h.T if h is not None else out

    def _sink_queries(self, layer: SinkQuantLayer, q: torch.Tensor) -> torch.Tensor | None:
        """Queries rotated back by the evicted count at each query time (sinks only)."""
        step = layer.step
        if self.config.max_cache_tokens is None or not layer.sink_pos:
            return None
        G = self.config.key_group_size
        done = torch.searchsorted(step.evict_time, step.q_pos, right=True)  # evictions at <= t
        shift = step.evicted_before + G * done
        if not bool((shift > 0).any()):
            return None
        check(self.inv_freq is not None, "StreamingLLM mode needs a RoPE model (no inv_freq found)")
        return rope_shift(q, shift.to(q.device), self.inv_freq.to(q.device))

    def _key_mask(self, layer: SinkQuantLayer) -> torch.Tensor | None:
        if self._padding is None:
            return None
        pos = layer.positions()
        return self._padding[:, pos].to(layer.device)

    # -- accounting ----------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes really held: fp16 sinks and window, packed codes, fp16 scales and zeros."""
        return sum(layer.nbytes() for layer in self.layers)

    def avg_bits(self) -> float:
        """Bits held per cached K/V element (everything counted), 0.0 when empty."""
        elems = 0
        for layer in self.layers:
            if layer.is_initialized:
                B, H, _, D = layer.sink_k.shape
                elems += 2 * B * H * D * layer.num_held()
        return 8.0 * self.nbytes() / elems if elems else 0.0


def resolve_kv_config(recipe: Any) -> KVConfig:
    """The KVConfig of a Recipe, a KVConfig, a recipe name/path or a mapping."""
    from quantsink.config import Recipe, from_dict, load_recipe

    if isinstance(recipe, KVConfig):
        return recipe
    if isinstance(recipe, Mapping) and "kv_cache" not in recipe and "name" not in recipe:
        return from_dict(KVConfig, recipe, "kv_cache")
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    check(rec.kv_cache is not None, f"recipe {rec.name!r} has no kv_cache section")
    return rec.kv_cache
