"""``SinkQuantCache``: a transformers Cache with fp16 sinks, a packed int2/4/8 body and an fp16 window.

Usage::

    cache = SinkQuantCache.from_recipe(model, "kv-int4-sink")   # also switches attention
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)   # or cache=cache

Per layer (:class:`~quantsink.kv.layer.SinkQuantLayer`): sink positions (calibrated
SinkMap, default the first ``num_sinks``) in fp16, the body as packed codes with fp16
scale/zero, and the most recent tokens in fp16, flushed into the body ``G`` at a time.
Each layer follows the model's own attention (:mod:`quantsink.hf.arch`): sliding-window
layers attend to their window only, learned sink logits (GPT-OSS) join the softmax
denominator, attention-logit softcapping (Gemma 2) is applied.

Decode steps go through :func:`quantsink.kv.attention.decode_path` (Triton on CUDA, the C++
kernel on the CPU, else the torch reference; each layer's ``kernel`` names the path of its
last step, with the reason when the reference ran instead of a kernel); chunks of several
tokens (prefill, teacher-forced evaluation, chunked streaming) through :func:`quantsink.kv.prefill.chunk_attention_ref`, which
reproduces token-by-token decoding exactly. No fp16 copy of the body is kept.

Correct by construction: every ``update`` of a layer must be read by quantsink's attention
in the same forward (a model whose attention bypasses it is refused with one line); the
cache serves only the model it was attached to, with the batch it started with.

Batches: rows of equal length share one layout. A left-padded batch (or one of several rows
with content sinks) is stored row by row (:mod:`quantsink.kv.rows`): each row keeps its own
first real tokens as sinks and its own flush schedule, so it is cached exactly as it would
be alone, and pads are never stored. A custom 4-D attention mask is refused with one line.
"""
from __future__ import annotations

import weakref
from typing import Any, Mapping

import torch

from quantsink.errors import QuantsinkError, check
from quantsink.hf import arch, forward
from quantsink.hf import attention as hf_attention
from quantsink.hf.cache_api import Cache
from quantsink.kv.attention import BACKENDS, decode_path, decode_with
from quantsink.kv.config import KVConfig
from quantsink.kv.layer import SinkQuantLayer
from quantsink.kv.prefill import chunk_attention_ref
from quantsink.kv.rotation import hadamard
from quantsink.kv.rows import RowsLayer
from quantsink.kv.tokens import TokenState


class SinkQuantCache(Cache):
    """Sink-aware quantized KV cache (see the module docstring)."""

    def __init__(self, config: KVConfig, num_layers: int, sink_map: Any = None,
                 backend: str = "auto", sliding_windows: list[int | None] | None = None) -> None:
        check(backend in BACKENDS, f"backend {backend!r} is not supported; allowed: {list(BACKENDS)}")
        windows = [None] * num_layers if sliding_windows is None else list(sliding_windows)
        check(len(windows) == num_layers, f"{len(windows)} sliding windows for {num_layers} layers")
        self.tokens = TokenState(config, sink_map)
        super().__init__(layers=[SinkQuantLayer(config, w) for w in windows])
        self.config, self.backend = config, backend
        self._stack: Any = None  # weak reference to the decoder stack of the attached model
        self._rope: dict[int, Any] = {}  # layer -> RopeShift (StreamingLLM mode)
        self._chunk = 0  # positions the running forward brings

    @classmethod
    def from_recipe(cls, model: Any, recipe: Any, sink_map: Any = None,
                    backend: str = "auto") -> "SinkQuantCache":
        """A cache for ``model`` from a Recipe, KVConfig, recipe name/path or dict; attaches it."""
        config = resolve_kv_config(recipe)
        specs = arch.attention_specs(model)
        cache = cls(config, len(specs), sink_map=sink_map, backend=backend,
                    sliding_windows=[s.sliding_window for s in specs])
        return cache.attach(model)

    def attach(self, model: Any) -> "SinkQuantCache":
        """Switch ``model`` to quantsink's attention and bind this cache to it (before use)."""
        specs = arch.attention_specs(model)
        name = type(model).__name__
        check(len(specs) == len(self.layers), f"this SinkQuantCache has {len(self.layers)} layers but {name} has "
                                              f"{len(specs)}; allowed: SinkQuantCache.from_recipe(model, recipe)")
        self._check_shapes(model)
        stack = arch.decoder_stack(model)
        check(self._stack is None or self._stack() is stack or not self.is_initialized,
              "this SinkQuantCache already holds another model's tokens; allowed: a new cache per model")
        for layer, spec in zip(self.layers, specs):
            if layer.sliding_window != spec.sliding_window:
                check(not layer.is_initialized, f"layer {spec.layer} of {name} slides over {spec.sliding_window} "
                                                f"tokens; this cache was filled for {layer.sliding_window}")
                layer.sliding_window, layer.is_sliding = spec.sliding_window, spec.sliding_window is not None
        hf_attention.switch(model)
        self._stack = weakref.ref(stack)
        if self.config.max_cache_tokens is not None:
            from quantsink.hf.rope import RopeShift

            self._rope = {s.layer: RopeShift(model, s.layer) for s in specs if s.kind == "full"}
        return self

    def _check_shapes(self, model: Any) -> None:
        """Recipe values that depend on the model: the context length (head_dim: see KVConfig.notes)."""
        name = type(model).__name__
        context = arch.context_length(model)
        check(context is None or max(self.tokens.positional, default=0) < context,
              f"sink positions up to {max(self.tokens.positional, default=0)} do not fit {name}'s context of "
              f"{context}; allowed: num_sinks < {context}")

    # -- forward protocol (called by quantsink.hf.forward's hooks) -------------------------
    def begin_forward(self, stack: Any, input_ids: torch.Tensor | None, attention_mask: Any,
                      has_embeds: bool = False) -> None:
        """A forward of the attached model starts: padding and content sinks of its tokens."""
        check(self._stack is not None and self._stack() is stack,
              "this SinkQuantCache is not attached to this model; create it with "
              "SinkQuantCache.from_recipe(model, recipe) or call cache.attach(model)")
        self._check_consumed()
        self.tokens.begin(input_ids, attention_mask, self.get_seq_length(), has_embeds)
        self._chunk = 0

    def end_forward(self) -> None:
        """The forward is over: every layer it updated must have been attended."""
        self._check_consumed()
        self.tokens.end(self._chunk)

    def _check_consumed(self) -> None:
        stale = [i for i, layer in enumerate(self.layers) if not layer.consumed]
        if stale:
            for i in stale:
                self.layers[i].consumed = True
            raise QuantsinkError(f"SinkQuantCache layer(s) {stale} were updated but never read by quantsink's "
                                 "attention: the model's attention does not go through transformers' "
                                 f"AttentionInterface; supported: {arch.SUPPORTED_FAMILIES}")

    # -- transformers Cache API ----------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new ``[B, Hkv, L, D]`` keys/values of layer ``layer_idx``."""
        if forward.active_cache() is not self:
            raise QuantsinkError("SinkQuantCache is not attached to this model; create it with "
                                 "SinkQuantCache.from_recipe(model, recipe) or call cache.attach(model)")
        self._check_consumed()
        layer, tokens = self.layers[layer_idx], self.tokens
        if tokens.ragged and not isinstance(layer, RowsLayer):
            layer = self.layers[layer_idx] = RowsLayer.split(layer, tokens.rows())
        if self.config.rotate:
            h = hadamard(key_states.shape[-1], key_states.device, key_states.dtype)
            key_states, value_states = key_states @ h, value_states @ h
        self._chunk = key_states.shape[2]
        if isinstance(layer, RowsLayer):
            layer.update(key_states, value_states, tokens.real, tokens.new_sinks, tokens.positional)
        else:  # one shared layout: no padding, and content sinks only with one row
            layer.admit_sinks(tokens.positional, tokens.new_sinks.get(0))
            layer.update(key_states, value_states)
        return key_states, value_states

    def reset(self) -> None:
        self.layers = [SinkQuantLayer(self.config, layer.sliding_window) for layer in self.layers]
        super().reset()
        self.tokens.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows ``beam_idx`` of every layer and of the padding / content state."""
        super().reorder_cache(beam_idx)
        self.tokens.select_rows(beam_idx.cpu())

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.tokens.select_rows(torch.arange(self.tokens.rows()).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.tokens.select_rows(torch.arange(self.tokens.rows())[indices.cpu()])

    def crop(self, *args: Any, **kwargs: Any) -> None:
        self.layers[0].crop(0)

    def activate_past_recording(self, *args: Any, **kwargs: Any) -> None:
        raise QuantsinkError("SinkQuantCache cannot be used by an assistant model (assisted decoding); "
                             "allowed: plain, sampled or beam-search generation")

    # -- attention -----------------------------------------------------------------------
    def attend(self, layer_idx: int, q: torch.Tensor, extras: Any) -> torch.Tensor:
        """Attention ``[B, Hq, L, D]`` of RoPE'd queries over layer ``layer_idx`` after its update."""
        layer = self.layers[layer_idx]
        check(not layer.consumed and layer.step is not None,
              f"layer {layer_idx} attends without a SinkQuantCache update in this forward")
        check(extras.sliding_window == layer.sliding_window,
              f"layer {layer_idx} attends with sliding_window={extras.sliding_window} but the cache was "
              f"built for {layer.sliding_window}; allowed: SinkQuantCache.from_recipe(model, recipe)")
        if isinstance(layer, RowsLayer):
            return layer.attend(q, lambda row, q_row: self._attend_layer(layer_idx, row, q_row, extras))
        return self._attend_layer(layer_idx, layer, q, extras)

    def _attend_layer(self, layer_idx: int, layer: SinkQuantLayer, q: torch.Tensor, extras: Any) -> torch.Tensor:
        """:meth:`attend` over one shared-layout layer (the whole batch, or one row of a RowsLayer)."""
        layer.consumed = True
        q_sink = self._sink_queries(layer_idx, layer, q)
        h = hadamard(q.shape[-1], q.device, q.dtype) if self.config.rotate else None
        if h is not None:
            q = q @ h
            q_sink = q_sink @ h if q_sink is not None else None
        opts = dict(sink_logits=extras.sink_logits, softcap=extras.softcap)
        if q.shape[2] == 1:
            layer.finish(next_query=layer.seen - 1)  # a decode step sees its own flushes and evictions
            body = layer.body_k if layer.body_k is not None and layer.body_k.num_tokens else None
            body_v = layer.body_v if body is not None else None
            layer.kernel = decode_path(q, body, body_v, self.backend)  # what ran, with the reason
            out = decode_with(layer.kernel, q, layer.sink_k, layer.sink_v, body, body_v, layer.win_k, layer.win_v,
                              extras.scaling, q_sink=q_sink, sliding_window=layer.sliding_window, **opts)
        else:
            out = chunk_attention_ref(layer, q, extras.scaling, q_sink=q_sink, **opts)
            layer.finish()
        return out @ h.T if h is not None else out

    def _sink_queries(self, layer_idx: int, layer: SinkQuantLayer, q: torch.Tensor) -> torch.Tensor | None:
        """Queries rotated back by the evicted count at each query time (sinks only)."""
        step = layer.step
        if self.config.max_cache_tokens is None or not layer.sink_pos or layer.is_sliding:
            return None
        G = self.config.key_group_size
        done = torch.searchsorted(step.evict_time, step.q_pos, right=True)  # evictions at <= t
        shift = step.evicted_before + G * done
        moved = shift > 0
        if not bool(moved.any()):
            return None
        q_sink = q.clone()  # queries before the first eviction keep their exact values
        q_sink[:, :, moved] = self._rope[layer_idx](q[:, :, moved], shift[moved].to(q.device))
        return q_sink

    # -- accounting ----------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes really held: fp16 sinks and window, packed codes, fp16 scales and zeros."""
        return sum(layer.nbytes() for layer in self.layers)

    def avg_bits(self) -> float:
        """Bits held per cached K/V element (everything counted), 0.0 when empty."""
        elems = sum(layer.held_elements() for layer in self.layers)
        return 8.0 * self.nbytes() / elems if elems else 0.0


def resolve_kv_config(recipe: Any) -> KVConfig:
    """The KVConfig of a Recipe, a KVConfig, a recipe name/path or a mapping."""
    from quantsink.config import Recipe, from_dict, load_recipe

    if isinstance(recipe, KVConfig):
        return recipe
    if isinstance(recipe, Mapping) and "kv_cache" not in recipe and "name" not in recipe:
        return from_dict(KVConfig, recipe, "kv_cache")
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    check(rec.kv_cache is not None, f"recipe {rec.name!r} has no kv_cache section; allowed: a recipe with one "
                                    "(e.g. kv-int4-sink, kv-int2-sink)")
    return rec.kv_cache
