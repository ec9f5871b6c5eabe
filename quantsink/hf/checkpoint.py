"""Which ``quant_method`` values transformers can load (its quantizer registry, quantsink's included).

transformers decides for itself what to do with a ``quantization_config`` it does not know
(in 5.x: load the plain architecture with freshly initialised weights and a log table); the
loaders ask here first, so that a misspelled method is one line instead of random weights.
"""
from __future__ import annotations


def known_quant_methods() -> list[str]:
    """The ``quant_method`` values with a registered transformers quantizer, and ``quantsink``
    (registered when transformers is imported: :mod:`quantsink._register`)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    return sorted(set(AUTO_QUANTIZER_MAPPING) & set(AUTO_QUANTIZATION_CONFIG_MAPPING) | {"quantsink"})
