"""transformers integration: ``quant_method: "quantsink"`` checkpoints load with ``from_pretrained``.

Importing this module registers :class:`QuantsinkConfig` and :class:`QuantsinkHfQuantizer`.
Before the weights load, the quantizer swaps the Linear layers listed in
``quantization_config["modules"]`` for :class:`~quantsink.weights.linear.QuantLinear`
shells (on the meta device); the loader then fills their buffers from the safetensors
shards. After loading, a checkpoint with a ``kv_cache`` section gets the default sink cache
of :func:`quantsink.hf.generate.enable_default_cache`: ``generate`` (and ``pipeline``)
builds the checkpoint's :class:`~quantsink.kv.cache.SinkQuantCache` with the calibrated
sink map whenever the call brings no cache and no ``cache_implementation``.
MoE experts modules listed there get :class:`~quantsink.weights.experts.QuantExperts` shells
the same way (:func:`~quantsink.weights.experts_load.replace_experts_shells`).
"""
from __future__ import annotations

from typing import Any

from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from quantsink.errors import check
from quantsink.weights.checkpoint import check_quantsink_config, missing_module
from quantsink.weights.groups import set_submodule
from quantsink.weights.runtime import make_shells, prepare_model

METHOD = "quantsink"


class QuantsinkConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a quantsink checkpoint (plain dicts inside)."""

    def __init__(self, version: int = 1, weights: dict | None = None, kv_cache: dict | None = None,
                 sink_map: dict | None = None, modules: list[str] | None = None,
                 recipe: str = "custom", **kwargs: Any) -> None:
        check_quantsink_config({**kwargs, "version": version, "weights": weights, "kv_cache": kv_cache,
                                "sink_map": sink_map, "modules": modules, "recipe": recipe}, complete=False)
        self.quant_method = METHOD
        self.version = version
        self.weights, self.kv_cache, self.sink_map = weights, kv_cache, sink_map
        self.modules = list(modules or [])
        self.recipe = recipe

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": METHOD, "version": self.version, "recipe": self.recipe,
                "weights": self.weights, "kv_cache": self.kv_cache, "sink_map": self.sink_map,
                "modules": list(self.modules)}


class QuantsinkHfQuantizer(HfQuantizer):
    """Loads pre-quantized quantsink checkpoints (quantizing on load is not supported)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        from quantsink.weights.experts_load import replace_experts_shells
        from quantsink.weights.linear import QuantLinear
        from quantsink.weights.outliers import outlier_count

        w = self.quantization_config.weights or {}
        for name in self.quantization_config.modules:
            _existing_module(model, name)
        for name in replace_experts_shells(model, self.quantization_config.modules, w):
            mod = model.get_submodule(name)
            check(isinstance(mod, nn.Linear), f"checkpoint module {name!r} is not a Linear layer")
            k = outlier_count(int(w.get("outlier_channels", 0)), mod.in_features)
            q = QuantLinear(mod.in_features, mod.out_features, int(w.get("bits", 4)),
                            int(w.get("group_size", 128)), k, mod.bias is not None,
                            device=mod.weight.device)
            set_submodule(model, name, q)
        make_shells(model, w)  # int8 embedding / lm_head

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        prepare_model(model)  # every QuantLinear picks its kernel now, once
        attach_kv_generate(model)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _existing_module(model: nn.Module, name: str) -> nn.Module:
    """``model.<name>``, or one line naming the checkpoint module the model does not have."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise missing_module(model, name) from None


def _get(qc: Any, key: str) -> Any:
    return qc.get(key) if isinstance(qc, dict) else getattr(qc, key, None)


def build_sink_cache(model: nn.Module) -> Any:
    """The ``SinkQuantCache`` described by ``model.config.quantization_config``."""
    from quantsink.config import from_dict
    from quantsink.kv.cache import SinkQuantCache
    from quantsink.kv.config import KVConfig

    qc = model.config.quantization_config
    kv = from_dict(KVConfig, _get(qc, "kv_cache"), "quantization_config.kv_cache")
    sink_map = None
    if _get(qc, "sink_map"):
        from quantsink.calibration import SinkMap

        sink_map = SinkMap.from_dict(_get(qc, "sink_map"))
    return SinkQuantCache.from_recipe(model, kv, sink_map=sink_map)


def attach_kv_generate(model: nn.Module) -> None:
    """Give ``model.generate`` the checkpoint's sink cache as its default cache (if it has one)."""
    from quantsink.hf.generate import enable_default_cache

    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and _get(qc, "kv_cache"):
        enable_default_cache(model, default_cache)


def default_cache(model: nn.Module) -> Any:
    """The cache ``generate`` builds for a quantsink model (looked up at call time)."""
    return build_sink_cache(model)


if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(METHOD)(QuantsinkConfig)
if METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(METHOD)(QuantsinkHfQuantizer)
