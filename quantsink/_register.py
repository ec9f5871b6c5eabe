"""Register the ``quantsink`` HF quantizer as soon as transformers' quantizer registry loads.

``import quantsink`` must stay cheap (no transformers import), yet
``import quantsink; AutoModelForCausalLM.from_pretrained(dir)`` must find the
``quant_method: "quantsink"`` quantizer. So ``import quantsink`` installs this tiny
meta-path finder; when ``transformers.quantizers.auto`` is imported (by ``from_pretrained``),
the finder runs the module as usual and then imports ``quantsink.weights.hf_quantizer``,
which registers the config and quantizer classes.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

TARGET = "transformers.quantizers.auto"


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec):  # noqa: ANN001
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        importlib.import_module("quantsink.weights.hf_quantizer")


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # find the real spec without recursing into ourselves
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else on its first import."""
    if TARGET in sys.modules:
        importlib.import_module("quantsink.weights.hf_quantizer")
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
