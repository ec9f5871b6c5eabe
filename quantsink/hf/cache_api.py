"""The transformers cache base classes (``Cache``, ``CacheLayerMixin``), in one place.

transformers >= 5.4 gives layers ``lazy_initialization(k, v)``, ``update(k, v, *args,
**kwargs) -> (K, V)``, ``get_mask_sizes(query_length) -> (kv_length, kv_offset)``,
``get_seq_length()`` and ``get_max_length()``; the container takes ``layers=[...]``.
"""
from __future__ import annotations

from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["Cache", "CacheLayerMixin"]
