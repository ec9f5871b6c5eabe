"""Checks of a model's numbers and sizes, shared by quantize, inspect and the loaders.

Each one refuses with one line (:class:`~quantsink.errors.QuantsinkError`) that names the
tensor, layer or statistic at fault and what is allowed: non-finite weights or statistics
are never quantized, written or turned into a bare ``NaN`` in a JSON file.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from quantsink.errors import check


def _first_bad(t: torch.Tensor) -> str | None:
    """``"2 NaN/Inf values, first at [0, 3]"`` for a tensor with non-finite values, else None."""
    if not t.is_floating_point() or t.device.type == "meta":
        return None
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    first = [int(i) for i in bad.nonzero()[0]]
    return f"{int(bad.sum())} NaN/Inf value(s), first at {first}"


def check_finite_tensors(tensors: Iterable[tuple[str, torch.Tensor]], what: str, allowed: str) -> None:
    """Refuse the first named tensor that holds NaN or Inf."""
    for name, t in tensors:
        where = _first_bad(t.detach())
        check(where is None, f"{what} {name!r} has {where}; allowed: {allowed}")


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model with a non-finite parameter (named: layer and tensor), before any work."""
    check_finite_tensors(model.named_parameters(), "weight",
                         "finite weights (the checkpoint is corrupt or was saved after a diverged run)")


def check_finite_json(doc: Any, what: str, path: str = "") -> None:
    """Refuse a JSON document with a NaN or Inf number (JSON has none); names the key path."""
    if isinstance(doc, float):
        check(math.isfinite(doc), f"{what}: {path or 'value'} is {doc} (not finite); allowed: finite "
                                  "statistics (the model's activations overflowed or are NaN)")
    elif isinstance(doc, dict):
        for k, v in doc.items():
            check_finite_json(v, what, f"{path}.{k}" if path else str(k))
    elif isinstance(doc, (list, tuple)):
        for i, v in enumerate(doc):
            check_finite_json(v, what, f"{path}[{i}]")


def check_seq_len(model: nn.Module, seq_len: int, flag: str = "--calib-seq-len") -> None:
    """Refuse calibration windows longer than the model's context."""
    from quantsink.hf.arch import context_length

    context = context_length(model)
    check(context is None or seq_len <= context,
          f"{flag} {seq_len} is longer than the model's context of {context} tokens; allowed: 2..{context}")

