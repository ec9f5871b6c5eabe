"""The transformers adapter: the only part of quantsink that touches transformers internals.

- :mod:`~quantsink.hf.arch`: decoder layers, attention modules, per-layer attention kinds
  (full / sliding window, learned sinks, softcapping), one line for unsupported models.
- :mod:`~quantsink.hf.forward`: a forward call's arguments (the cache under ``cache`` or
  ``past_key_values``), the sink cache of the running forward, the decoder-stack hooks.
- :mod:`~quantsink.hf.attention`: switching attention to quantsink's and checking the
  switch took; exact fallback to the base implementation for other caches.
- :mod:`~quantsink.hf.rope`: StreamingLLM's RoPE shift through the model's rotary embedding.
- :mod:`~quantsink.hf.generate`: the default sink cache of ``generate`` / ``pipeline``.
- :mod:`~quantsink.hf.cache_api`: the transformers ``Cache`` base classes the cache builds on.
- :mod:`~quantsink.hf.capture`: every decoder layer's own call, recorded during one pass of
  the unmodified model and replayed layer by layer.
- :mod:`~quantsink.hf.moe`: the 3-D experts layouts (flags of ``use_experts_implementation``),
  the eager experts loop with a pluggable per-expert product, routers.
- :mod:`~quantsink.hf.support`: one check for the models quantsink can run.
- :mod:`~quantsink.hf.checkpoint`: the ``quant_method`` values transformers can load.

Importing this package imports transformers; ``import quantsink`` does not.
"""
