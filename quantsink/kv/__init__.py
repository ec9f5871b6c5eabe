"""Sink-aware KV-cache quantization: packed primitives, reference attention, the cache."""
