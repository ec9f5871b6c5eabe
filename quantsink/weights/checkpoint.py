"""Checking a checkpoint's ``quantization_config`` before its weights load.

A quantsink checkpoint's section is as strict as a recipe: known keys only, ``weights`` and
``kv_cache`` built through the same :class:`~quantsink.weights.config.WeightConfig` /
:class:`~quantsink.kv.config.KVConfig` code, a valid sink map, module names as strings (that
the model has them is checked once the model skeleton exists, in
:mod:`quantsink.weights.hf_quantizer`). Any other ``quant_method`` must be one transformers
has a quantizer for.
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping

from quantsink.errors import QuantsinkError, check
from quantsink.hf.checkpoint import known_quant_methods

KEYS = ("quant_method", "version", "recipe", "weights", "kv_cache", "sink_map", "modules")
WHERE = "quantization_config"


def check_quant_method(qc: Any, where: str = WHERE) -> str:
    """The ``quant_method`` of ``qc``, refused unless transformers has a quantizer for it."""
    check(isinstance(qc, Mapping), f"{where} must be a JSON object, got {type(qc).__name__}; allowed: "
                                   "an object with a quant_method")
    method, known = qc.get("quant_method"), known_quant_methods()
    near = difflib.get_close_matches(str(method), known, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    check(isinstance(method, str) and method in known,
          f"{where}.quant_method {method!r} is not a quantization method transformers can load{hint}; "
          f"allowed: {', '.join(known)}")
    return method


def check_quantsink_config(qc: Mapping[str, Any], where: str = WHERE, complete: bool = True) -> None:
    """Refuse a malformed quantsink ``quantization_config`` with one line (``complete``: it must
    also have a section, and a weights section when it lists modules)."""
    from quantsink.calibration.sinkmap import SinkMap
    from quantsink.config import from_dict
    from quantsink.kv.config import KVConfig
    from quantsink.weights.config import WeightConfig

    unknown = sorted(set(qc) - set(KEYS))
    check(not unknown, f"{where}: unknown key(s) {unknown}; allowed: {list(KEYS)}")
    check(qc.get("version", 1) == 1, f"{where}: quantsink checkpoint version {qc.get('version')!r} is not "
                                     "supported; allowed: 1")
    for key, cls in (("weights", WeightConfig), ("kv_cache", KVConfig)):
        if qc.get(key) is not None:
            try:
                from_dict(cls, qc[key], f"{where}.{key}")
            except QuantsinkError as exc:
                raise (exc if str(exc).startswith(where) else QuantsinkError(f"{where}: {exc}")) from None
    if qc.get("sink_map") is not None:
        SinkMap.from_dict(qc["sink_map"])
    modules = qc.get("modules") or []
    check(isinstance(modules, list) and all(isinstance(m, str) for m in modules),
          f"{where}.modules must be a list of module names; allowed: e.g. ['model.layers.0.mlp.up_proj']")
    if not complete:
        return
    check(not modules or qc.get("weights") is not None,
          f"{where} lists {len(modules)} quantized modules but has no weights section; allowed: a weights "
          "section whenever modules is not empty")
    check(qc.get("weights") is not None or qc.get("kv_cache") is not None,
          f"{where} has neither a weights nor a kv_cache section; allowed: at least one")


def check_config_json(config: Mapping[str, Any], where: str) -> None:
    """``config.json``'s ``quantization_config`` (if any): a known method, strict when quantsink's."""
    qc = config.get("quantization_config")
    if qc is None:
        return
    if check_quant_method(qc, f"{where}: quantization_config") == "quantsink":
        check_quantsink_config(qc, f"{where}: quantization_config")


def missing_module(model: Any, name: str) -> QuantsinkError:
    """The one line for a ``modules`` entry the model does not have."""
    from torch import nn

    example = next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)), "")
    return QuantsinkError(f"{WHERE}.modules lists {name!r}, which {type(model).__name__} does not have; "
                          f"allowed: the model's Linear layers and experts modules, e.g. {example!r}")


def check_not_quantized_dir(spec: str, flag: str = "--model") -> None:
    """Refuse a local checkpoint directory that is already quantized (a quantsink or
    compressed-tensors export), before its weights load."""
    from pathlib import Path

    from quantsink.io import read_json

    path = Path(spec).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()):
        return
    config = read_json(path / "config.json", "model config", "a Hugging Face config.json")
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    method = qc.get("quant_method") if isinstance(qc, Mapping) else qc
    check(qc is None, f"{flag} {spec!r} is already quantized (quant_method {method!r}); quantizing it again "
                      "would round rounded weights; allowed: the original floating-point model")
