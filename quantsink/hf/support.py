"""One check for the models quantsink can run: layout, layer kinds and attention routing.

:func:`check_supported` refuses, with one line naming the problem and the supported
families, a model whose decoder layers are not where :func:`~quantsink.hf.arch.decoder_layers`
looks, whose attention is not causal or has an unknown layer type, or whose attention
ignores transformers' ``AttentionInterface`` (Falcon): the calibration attention, the
sequential quantizer and the sink cache all rely on these.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantsink.hf.arch import attention_specs
from quantsink.hf.attention import custom_attention

PROBE = "quantsink_probe"


def _probe(module: nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the probe attention is never called")  # only registered, never run


def check_supported(model: nn.Module) -> None:
    """One line (:class:`~quantsink.errors.QuantsinkError`) unless quantsink can run ``model``."""
    attention_specs(model)
    with custom_attention(model, PROBE, _probe):
        pass
