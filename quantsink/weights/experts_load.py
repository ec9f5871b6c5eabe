"""Reloading packed MoE experts: shells created before transformers loads the weights."""
from __future__ import annotations

from torch import nn

from quantsink.errors import check
from quantsink.hf.moe import is_experts
from quantsink.weights.experts import experts_shell
from quantsink.weights.groups import set_submodule


def replace_experts_shells(model: nn.Module, modules: list[str], weights: dict) -> list[str]:
    """Swap every experts module named in ``modules`` for an empty
    :class:`~quantsink.weights.experts.QuantExperts` of the checkpoint's settings (on the
    module's device, the meta device while loading); returns the other names."""
    rest = []
    for name in modules:
        mod = model.get_submodule(name)
        if not is_experts(mod):
            rest.append(name)
            continue
        check(any(p.dim() == 3 for p in mod.parameters(recurse=False)),
              f"checkpoint module {name!r} is already quantized")
        shell = experts_shell(mod, int(weights.get("bits", 4)), int(weights.get("group_size", 128)),
                              int(weights.get("outlier_channels", 0)))
        set_submodule(model, name, shell)
    return rest
