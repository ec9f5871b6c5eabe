"""The small shared pieces of the weight pipeline, with no dependencies of their own: the
group of Linear layers that read one input (:class:`InputGroup`), the ignore-list match and
submodule replacement. A leaf module, so that the planner, the statistics, the quantizers and
the replay all import it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class InputGroup:
    """Linear layers (names relative to their decoder layer) that read the same input."""

    names: list[str]
    absmax: torch.Tensor  # [in] float32
    hessian: torch.Tensor | None = None  # [in, in] float32, X^T X / tokens
    tokens: int = 0
    extra: dict = field(default_factory=dict)
    mean_abs: torch.Tensor | None = None  # [in] float32, mean |x| (the AWQ scale statistic)


def is_ignored(name: str, ignore: list[str]) -> bool:
    """True when ``name`` equals an ``ignore`` entry or ends with ``.<entry>``."""
    return any(name == p or name.endswith("." + p) for p in ignore)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace ``root.<name>`` (a dotted path) by ``module``."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)
