"""Which matrices of a decoder layer get quantized, and how much stays in floating point.

:func:`layer_plan` sorts every parameter with two or more dimensions inside a decoder layer:
``nn.Linear`` weights and transformers experts modules are quantized, MoE routers stay in
floating point (reported), anything else (GPT-2's ``Conv1D``, an unknown fused layout) is
refused with one line before any work, so that nothing is silently left unquantized.
:func:`float_report` measures the result: how many of the decoder's matrix elements are
still floating point (fp16 outlier columns included) and which matrices were kept whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from quantsink.errors import QuantsinkError, check
from quantsink.hf.arch import SUPPORTED_FAMILIES, decoder_layers
from quantsink.hf.moe import find_experts, routers
from quantsink.weights.groups import is_ignored

QUANTIZABLE = "nn.Linear layers and transformers MoE experts modules"


@dataclass
class LayerPlan:
    """The quantization plan of one decoder layer (names relative to the layer)."""

    linears: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    floating: dict[str, str] = field(default_factory=dict)  # parameter name -> why it stays float


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_plan(layer: nn.Module, index: int, prefix: str = "layers") -> LayerPlan:
    """Sort the matrices of decoder layer ``index`` (at ``<prefix>.<index>``); one line for
    anything quantsink cannot pack."""
    plan = LayerPlan(experts=[n for n, _ in find_experts(layer)], floating=routers(layer))
    router_modules = [n.rpartition(".")[0] for n in plan.floating]
    for name, mod in layer.named_modules():
        if _inside(name, plan.experts) or name in router_modules:
            continue
        if isinstance(mod, nn.Linear):
            plan.linears.append(name)
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() >= 2:
                raise QuantsinkError(
                    f"{prefix}.{index}.{name}.{pname} ({type(mod).__name__}, {tuple(p.shape)}) is "
                    f"neither an nn.Linear nor a transformers experts module, so it cannot be quantized; "
                    f"allowed: {QUANTIZABLE} (supported: {SUPPORTED_FAMILIES})")
    return plan


def check_quantizable(model: nn.Module) -> list[LayerPlan]:
    """:func:`layer_plan` of every decoder layer (one line for the first unknown matrix)."""
    prefix, layers = decoder_layers(model)
    return [layer_plan(layer, i, prefix) for i, layer in enumerate(layers)]


def float_report(model: nn.Module) -> dict:
    """Floating-point share of the decoder's matrix elements after quantization.

    Counts every matrix of the decoder layers (Linear weights, expert matrices, routers,
    anything 2-D and up): quantized ones contribute their fp16 outlier columns, matrices
    left whole contribute all their elements and are listed with the reason.
    """
    from quantsink.weights.experts import QuantExperts
    from quantsink.weights.linear import QuantLinear

    prefix, layers = decoder_layers(model)
    total = floating = 0
    kept: list[dict] = []
    for i, layer in enumerate(layers):
        why = routers(layer)
        packed = [n for n, m in layer.named_modules() if isinstance(m, (QuantLinear, QuantExperts))]
        for name, mod in layer.named_modules():
            if name in packed:
                t, f = _packed_elements(mod)
                total, floating = total + t, floating + f
                continue
            if _inside(name, packed):
                continue
            for pname, p in mod.named_parameters(recurse=False):
                if p.dim() >= 2:
                    full = f"{name}.{pname}" if name else pname
                    total, floating = total + p.numel(), floating + p.numel()
                    kept.append({"name": f"{prefix}.{i}.{full}", "shape": list(p.shape),
                                 "reason": why.get(full, "not quantized (ignored)")})
    return {"decoder_matrix_elements": total, "decoder_float_elements": floating,
            "decoder_float_fraction": round(floating / total, 6) if total else 0.0,
            "float_matrices": kept}


def _packed_elements(mod: nn.Module) -> tuple[int, int]:
    """(matrix elements, fp16 outlier elements) of a QuantLinear or QuantExperts."""
    if hasattr(mod, "layout"):
        parts = [getattr(mod, p) for p in mod.layout.projections]
        return (sum(p.num_experts * p.out_features * p.in_features for p in parts),
                sum(p.outlier_weight.numel() for p in parts))
    return mod.out_features * mod.in_features, mod.outlier_weight.numel()


def check_ignore(model: nn.Module, ignore: list[str]) -> None:
    """Refuse ``weights.ignore`` entries that name no module of ``model`` (a typo would
    otherwise quantize the layer it meant to keep)."""
    names = [n for n, _ in model.named_modules() if n]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for entry in ignore:
        check(any(is_ignored(n, [entry]) for n in names),
              f"weights.ignore entry {entry!r} matches no module of {type(model).__name__}; allowed: a "
              f"module name or its last components, e.g. {_leaf_names(linears)}")


def _leaf_names(names: list[str], limit: int = 12) -> str:
    leaves = list(dict.fromkeys(n.rpartition(".")[2] for n in names))
    return ", ".join(leaves[:limit]) + (", ..." if len(leaves) > limit else "")


def check_outlier_channels(model: nn.Module, plans: list[LayerPlan], requested: int,
                           ignore: list[str]) -> None:
    """Refuse ``weights.outlier_channels`` above half of the input width of a quantized Linear
    or experts projection (instead of keeping fewer than the recipe asks for)."""
    from quantsink.hf.moe import expert_matrices, experts_layout

    prefix, layers = decoder_layers(model)
    for i, (layer, plan) in enumerate(zip(layers, plans)):
        widths = [(f"{prefix}.{i}.{name}", layer.get_submodule(name).in_features) for name in plan.linears
                  if not is_ignored(f"{prefix}.{i}.{name}", ignore)]
        for name in plan.experts:  # experts are always quantized
            module = layer.get_submodule(name)
            layout = experts_layout(module)
            widths += [(f"{prefix}.{i}.{name}.{proj}", expert_matrices(module, layout, proj).shape[2])
                       for proj in layout.projections]
        for where, width in widths:
            check(requested <= width // 2,
                  f"weights.outlier_channels={requested} is more than half of {where}'s "
                  f"input width {width}; allowed: 0..{width // 2} for this model")
