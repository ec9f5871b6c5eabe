"""A default sink cache in ``generate`` (and ``pipeline``), without patching the instance.

:func:`enable_default_cache` gives a model a subclass of its own class whose ``generate``
builds a fresh cache from ``cache_factory(model)`` whenever the call brings none: no cache
under either keyword, no ``cache_implementation``, ``use_cache`` not False. The subclass
keeps the base class's ``__name__`` (pipelines and logs see the usual model name), is
created once per base class and is reachable by its qualified name in this module, so
``copy.deepcopy`` and pickling keep it. This is the pattern of
``torch.nn.utils.parametrize``. A call that passes ``cache=`` on a transformers version that
only knows ``past_key_values`` has it renamed.

With the default cache, the prompt is prefilled in chunks of :data:`PREFILL_CHUNK` tokens
(transformers' own ``prefill_chunk_size``) unless the call or the generation config sets it
(``prefill_chunk_size=None`` turns it off). The sink cache's chunk attention sees exactly
what token-by-token decoding would (:mod:`quantsink.kv.prefill`), so chunking changes no
result, only the peak memory: a 2,048-token prompt's activations are an eighth as large.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from quantsink.hf.forward import CACHE_NAMES, cache_keyword

_CLASSES: dict[type, type] = {}
_FACTORY_ATTR = "_quantsink_cache_factory"
PREFILL_CHUNK = 256  # prompt tokens per prefill forward with the default cache


class DefaultSinkCache:
    """Mixin: ``generate`` builds the model's sink cache when the call brings no cache."""

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        keyword = cache_keyword(self)
        for name in CACHE_NAMES:
            if name != keyword and kwargs.get(name) is not None and kwargs.get(keyword) is None:
                kwargs[keyword] = kwargs.pop(name)
        gen = kwargs.get("generation_config") or self.generation_config
        if _wants_default_cache(gen, kwargs):
            kwargs[keyword] = getattr(type(self), _FACTORY_ATTR)(self)
            if "prefill_chunk_size" not in kwargs and getattr(gen, "prefill_chunk_size", None) is None:
                kwargs["prefill_chunk_size"] = PREFILL_CHUNK
        return super().generate(*args, **kwargs)


def _wants_default_cache(gen: Any, kwargs: dict) -> bool:
    if any(kwargs.get(name) is not None for name in CACHE_NAMES):
        return False
    use_cache = kwargs.get("use_cache", getattr(gen, "use_cache", True))
    impl = kwargs.get("cache_implementation", getattr(gen, "cache_implementation", None))
    return use_cache is not False and impl is None


def enable_default_cache(model: nn.Module, cache_factory: Callable[[nn.Module], Any]) -> nn.Module:
    """Make ``model.generate`` build ``cache_factory(model)`` by default (idempotent)."""
    base = type(model)
    if isinstance(model, DefaultSinkCache):
        base = next(c for c in base.__mro__[1:] if not issubclass(c, DefaultSinkCache))
    cls = _CLASSES.get(base)
    if cls is None:
        qualname = f"DefaultSinkCache_{base.__module__.replace('.', '_')}_{base.__qualname__}"
        cls = type(base.__name__, (DefaultSinkCache, base), {"__module__": __name__, "__qualname__": qualname})
        globals()[qualname] = cls
        _CLASSES[base] = cls
    setattr(cls, _FACTORY_ATTR, staticmethod(cache_factory))
    model.__class__ = cls
    return model
