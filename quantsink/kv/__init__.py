"""Sink-aware KV-cache quantization: packed primitives, reference attention, the cache.

- :mod:`~quantsink.kv.primitives`: planar int2/4/8 packing, keys per channel / values per token.
- :mod:`~quantsink.kv.attention`: ``decode_attention_ref`` (the kernel spec) and the dispatcher.
- :mod:`~quantsink.kv.cache`: ``SinkQuantCache`` (fp16 sinks, packed body, fp16 window).
- :mod:`~quantsink.kv.layer` / :mod:`~quantsink.kv.prefill`: per-layer storage and the faithful
  chunk attention; :mod:`~quantsink.kv.integration`: the transformers attention hook;
  :mod:`~quantsink.kv.rotation`: Hadamard rotation and RoPE shifts (StreamingLLM).
"""
