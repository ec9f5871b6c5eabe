"""quantsink: compress LLMs without falling into the attention-sink trap.

Public API (imported lazily, so ``import quantsink`` is cheap and needs no triton)::

    model, tok = quantsink.load_model("smollm2-135m")
    recipe = quantsink.load_recipe("int4-sink")
    quantsink.quantize_streaming("big-model/", "w4-g64", "out/", calib="calib.txt")  # from disk
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "quantsink.models",
    "QuantsinkError": "quantsink.errors",
    "Recipe": "quantsink.config",
    "load_recipe": "quantsink.config",
    "available_recipes": "quantsink.config",
    "calibration_windows": "quantsink.data",
    "KVConfig": "quantsink.kv.config",
    "WeightConfig": "quantsink.weights.config",
    "perplexity": "quantsink.eval",
    # filled in by the calibration, cache and weight modules:
    "calibrate": "quantsink.calibration",
    "SinkMap": "quantsink.calibration",
    "CalibrationResult": "quantsink.calibration",
    "SinkQuantCache": "quantsink.kv.cache",
    "quantize": "quantsink.weights.api",
    "quantize_": "quantsink.weights.api",
    "load": "quantsink.weights.api",
    "export": "quantsink.weights.export",
    "quantize_streaming": "quantsink.weights.streaming",
}

__all__ = sorted(_EXPORTS)

from quantsink import _register  # noqa: E402  (a finder only; imports nothing heavy)

_register.install()


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quantsink' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
