"""Sink-aware KV-cache quantization: packed primitives, reference attention, the cache.

- :mod:`~quantsink.kv.primitives`: planar int2/4/8 packing, keys per channel / values per token.
- :mod:`~quantsink.kv.attention`: ``decode_attention_ref`` (the kernel spec) and the dispatcher.
- :mod:`~quantsink.kv.cache`: ``SinkQuantCache`` (fp16 sinks, packed body, fp16 window).
- :mod:`~quantsink.kv.layer` / :mod:`~quantsink.kv.prefill`: per-layer storage and the faithful
  chunk attention; :mod:`~quantsink.kv.tokens`: sink positions, padding, content sinks;
  :mod:`~quantsink.kv.rotation`: the Hadamard rotation. The transformers side (attention
  switch, forward hooks, RoPE shift) is in :mod:`quantsink.hf`.
"""
