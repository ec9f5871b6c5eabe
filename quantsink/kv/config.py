"""The ``kv_cache`` section of a recipe."""
from __future__ import annotations

from dataclasses import dataclass

from quantsink.errors import check

SUPPORTED_KV_BITS = (2, 4, 8)
MAX_GROUP = 1024  # tokens per key group / channels per value group
MAX_SINKS = 4096  # fp16 sink positions (a handful is the point; a typo must not allocate billions)
DENSE_DTYPES = ("half", "model")


@dataclass
class KVConfig:
    """Sink-aware KV cache quantization settings.

    Keys are quantized per channel in groups of ``key_group_size`` tokens, values per
    token in groups of ``value_group_size`` channels (a group never spans two heads: a size of
    head_dim or more is one group per head, and one that does not divide head_dim becomes its
    largest divisor below it, e.g. 48 for 64 at Phi-3's head_dim 96: :meth:`value_group_for`). ``num_sinks`` leading positions
    (or the calibrated sink map) and the last ``window`` tokens stay in fp16/bf16. With
    ``content_sinks``, the first ``content_sink_occurrences`` occurrences per sequence of
    every content-sink token id of the calibrated sink map stay in fp16 too.
    ``value_symmetric`` stores one scale per value group and no zero (see
    :mod:`quantsink.kv.primitives`); ``key_outliers`` keeps that many fp16 outliers per
    channel and key group (:mod:`quantsink.kv.outliers`); ``rotate`` applies a Hadamard
    rotation to head_dim. ``dense_dtype``: the sinks and the window are stored in fp16 (bf16
    for bf16 models) with ``"half"``, or in the model's own dtype with ``"model"``.
    """

    key_bits: int = 4
    value_bits: int = 4
    key_group_size: int = 64
    value_group_size: int = 64
    num_sinks: int = 4
    window: int = 128
    content_sinks: bool = False
    content_sink_occurrences: int = 1
    max_cache_tokens: int | None = None
    rotate: bool = False
    clip: bool = False
    value_symmetric: bool = False
    key_outliers: int = 0
    dense_dtype: str = "half"

    def __post_init__(self) -> None:
        check(self.dense_dtype in DENSE_DTYPES,
              f"kv_cache.dense_dtype={self.dense_dtype!r} is not supported; allowed: {list(DENSE_DTYPES)}")
        for name in ("key_bits", "value_bits"):
            bits = getattr(self, name)
            check(bits in SUPPORTED_KV_BITS,
                  f"kv_cache.{name}={bits} is not supported; allowed: {list(SUPPORTED_KV_BITS)}")
        for name in ("key_group_size", "value_group_size"):
            g = getattr(self, name)
            check(0 < g <= MAX_GROUP, f"kv_cache.{name} must be in 1..{MAX_GROUP}, got {g}")
        check(0 <= self.num_sinks <= MAX_SINKS, f"kv_cache.num_sinks must be in 0..{MAX_SINKS}, got {self.num_sinks}")
        check(self.content_sink_occurrences <= MAX_SINKS,
              f"kv_cache.content_sink_occurrences must be <= {MAX_SINKS}, got {self.content_sink_occurrences}")
        check(self.window >= 0, f"kv_cache.window must be >= 0, got {self.window}")
        check(self.window == 0 or self.window >= self.key_group_size,
              f"kv_cache.window={self.window} is shorter than one key group "
              f"({self.key_group_size}); allowed: 0 or >= key_group_size")
        check(0 <= self.key_outliers < self.key_group_size // 2,
              f"kv_cache.key_outliers={self.key_outliers} is not supported; allowed: 0 to "
              f"{self.key_group_size // 2 - 1} per key group of {self.key_group_size}")
        check(self.content_sink_occurrences >= 1,
              f"kv_cache.content_sink_occurrences must be >= 1, got {self.content_sink_occurrences}")
        if self.max_cache_tokens is not None:
            need = self.num_sinks + self.window + self.key_group_size
            check(self.max_cache_tokens >= need,
                  f"kv_cache.max_cache_tokens={self.max_cache_tokens} cannot hold num_sinks + window + "
                  f"one key group = {need}; allowed: >= {need}")

    def value_group_for(self, head_dim: int) -> int:
        """The value group used at ``head_dim``: the largest divisor of it up to ``value_group_size``."""
        group = min(self.value_group_size, head_dim)
        while head_dim % group:
            group -= 1
        return group

    def notes(self, head_dim: int) -> list[str]:
        """One line per setting that takes another form at ``head_dim`` (for the report)."""
        out = []
        if self.value_group_for(head_dim) not in (self.value_group_size, head_dim):
            out.append(f"value_group_size {self.value_group_size} -> {self.value_group_for(head_dim)} channels "
                       f"(the largest divisor of head_dim {head_dim})")
        block = head_dim & -head_dim
        if self.rotate and block != head_dim:
            out.append(f"rotate: block-diagonal Hadamard, {head_dim // block} blocks of {block} (head_dim {head_dim} "
                       "is not a power of two)")
        return out
