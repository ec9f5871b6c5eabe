"""The compressed-tensors ``pack-quantized`` weight-only format (W4A16): rules, layer plan, config.

This is what compressed-tensors 0.20.1 writes for an integer weight-only group scheme
(``PackedQuantizationCompressor.compress`` and ``ModelCompressor.update_config``), and what
transformers' compressed-tensors integration and vLLM's ``CompressedTensorsWNA16`` read:

- per quantized Linear ``<name>.weight_packed`` int32 ``[out, in * bits / 32]`` (code
  ``q + 2**(bits-1)`` of the signed value ``q``; element ``i`` of a row at bits
  ``bits * (i % (32 // bits))`` of word ``i // (32 // bits)``), ``<name>.weight_scale``
  ``[out, in / group]`` (float), ``<name>.weight_shape`` int64 ``[out, in]``, and, for
  asymmetric grids only, ``<name>.weight_zero_point`` int32 ``[out * bits / 32, in / group]``
  (the signed zero point + 2**(bits-1), packed along the *output* dimension);
  value = ``(q - zero) * scale``. quantsink's unsigned codes and zero points are exactly those
  offset values, so the packed words are quantsink's own (:mod:`quantsink.weights.pack`);
- no partial groups: compressed-tensors' group quantize/dequantize and vLLM's kernels need
  ``in_features % group_size == 0`` for every quantized layer;
- no fp16 input channels inside a layer: only whole layers can stay unquantized (``ignore``).

A model whose layers need different group sizes gets one config group per size, each
targeting its layers by name (``re:`` patterns); a uniform model gets ``targets: ["Linear"]``
as llm-compressor writes it. Nothing here imports compressed-tensors.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from torch import nn

from quantsink.errors import QuantsinkError, check
from quantsink.weights.groups import is_ignored

QUANTSINK = "quantsink"
COMPRESSED_TENSORS = "compressed-tensors"
FORMATS = (QUANTSINK, COMPRESSED_TENSORS)
CT_VERSION = "0.20.1"  # the compressed-tensors release whose layout and config this matches
CT_GROUP_SIZES = (128, 64, 32)  # vLLM Marlin: [-1, 32, 64, 128]; -1 (per channel) is not used
CT_BITS = (4, 8)


def check_format(format: str) -> str:
    """``format`` if it is a supported checkpoint format, else a one-line error."""
    check(format in FORMATS, f"format {format!r} is not supported; allowed: {list(FORMATS)}")
    return format


def recipe_for_format(recipe: Any, format: str, drop_outliers: bool = False,
                      group_fallback: bool = False) -> Any:
    """The recipe ``quantize`` runs to produce ``format`` (checked before any heavy work).

    compressed-tensors stores no fp16 outlier input channels, so a recipe asking for them is
    refused unless ``drop_outliers`` (then its outlier channels are quantized like the rest).
    """
    check_format(format)
    if format == QUANTSINK:
        for flag, name in ((drop_outliers, "drop-outliers"), (group_fallback, "group-fallback")):
            check(not flag, f"--{name} ({name.replace('-', '_')}=True) only applies to the "
                            f"{COMPRESSED_TENSORS!r} format; allowed: --format {COMPRESSED_TENSORS}")
        return recipe
    w = recipe.weights
    check(w is not None, f"recipe {recipe.name!r} has no weights section, and --format "
                         f"{COMPRESSED_TENSORS} writes quantized weights; allowed: a recipe with a "
                         "weights section (e.g. w4-ct-g128)")
    check(w.bits in CT_BITS, f"weights.bits={w.bits} cannot be written as {COMPRESSED_TENSORS} "
                             f"pack-quantized; allowed: {list(CT_BITS)}")
    check(w.group_size in CT_GROUP_SIZES, f"weights.group_size={w.group_size} cannot be written as "
                                          f"{COMPRESSED_TENSORS}; allowed: {list(CT_GROUP_SIZES)}")
    check(w.outlier_channels == 0 or drop_outliers,
          f"recipe {recipe.name!r} keeps weights.outlier_channels={w.outlier_channels} fp16 input "
          f"channels per layer, which {COMPRESSED_TENSORS} pack-quantized cannot store; allowed: a "
          "recipe with weights.outlier_channels: 0 (e.g. w4-ct-g128), or --drop-outliers "
          "(drop_outliers=True) to quantize those channels to int as well")
    check(w.embedding_bits is None and w.lm_head_bits is None,
          f"recipe {recipe.name!r} stores the embedding / lm_head as int8 rows, which the "
          f"{COMPRESSED_TENSORS} W4A16 scheme does not hold; allowed: weights.embedding_bits: null and "
          "weights.lm_head_bits: null (e.g. w4-ct-g128)")
    return dataclasses.replace(recipe, weights=dataclasses.replace(w, outlier_channels=0))


def decoder_linears(model: nn.Module, ignore: list[str]) -> list[tuple[str, nn.Linear]]:
    """``(qualified name, module)`` of every decoder ``nn.Linear`` a recipe quantizes."""
    from quantsink.weights.sequential import decoder_layers

    prefix, layers = decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        for n, m in layer.named_modules():
            name = f"{prefix}.{i}.{n}"
            if isinstance(m, nn.Linear) and not is_ignored(name, ignore):
                out.append((name, m))
    return out


def fit_group_size(in_features: int, wanted: int, fallback: bool) -> int | None:
    """``wanted`` if it divides ``in_features``; with ``fallback`` the largest smaller one that does."""
    sizes = [g for g in CT_GROUP_SIZES if g <= wanted] if fallback else [wanted]
    return next((g for g in sizes if in_features % g == 0), None)


def plan_group_sizes(model: nn.Module, weights: Any, fallback: bool = False) -> dict[str, int]:
    """Group size of every decoder Linear the ``weights`` section quantizes (name -> size).

    Without ``fallback`` a group size that does not divide some layer's input width is a
    one-line error (compressed-tensors and vLLM need whole groups); with it, such layers get
    the largest of :data:`CT_GROUP_SIZES` below the recipe's size that divides them.
    """
    layers = decoder_linears(model, weights.ignore)
    plan = {n: fit_group_size(m.in_features, weights.group_size, fallback) for n, m in layers}
    bad = [(n, m.in_features) for n, m in layers if plan[n] is None]
    if bad:
        ok = [g for g in CT_GROUP_SIZES if all(m.in_features % g == 0 for _, m in layers)]
        raise plan_error(weights.group_size, bad, len(layers), ok, fallback)
    return {n: g for n, g in plan.items() if g is not None}


def plan_error(group_size: int, bad: list[tuple[str, int]], total: int, ok: list[int],
               fallback: bool) -> QuantsinkError:
    """The one-line error for a group size that does not divide some layers' input widths."""
    name, n = bad[0]
    where = f"{len(bad)} of {total} layers (first: {name}, in_features={n})"
    if fallback:
        return QuantsinkError(f"no group size in {list(CT_GROUP_SIZES)} divides the input width of "
                              f"{where}; {COMPRESSED_TENSORS} needs whole groups; allowed: "
                              "weights.ignore for those layers (they stay unquantized)")
    sizes = f"weights.group_size {' or '.join(map(str, ok))} (divides every layer), or " if ok else ""
    return QuantsinkError(f"weights.group_size={group_size} does not divide the input width of "
                          f"{where}; {COMPRESSED_TENSORS} and vLLM need whole groups; allowed: {sizes}"
                          f"--group-fallback (group_fallback=True) to give those layers the largest "
                          f"of {list(CT_GROUP_SIZES)} that divides them")


def group_quantizer(weights: Any, plan: dict[str, int], hidden_size: int) -> Callable:
    """A ``quantize_group`` callback (see :func:`quantize_layers`) honouring ``plan``'s group sizes."""
    from quantsink.weights.layer import make_group_quantizer

    by_size = {g: make_group_quantizer(dataclasses.replace(weights, group_size=g), [], hidden_size)
               for g in sorted(set(plan.values()))}

    def quantize_group(layer: nn.Module, prefix: str, group: Any) -> list[dict]:
        sizes = {plan[f"{prefix}.{n}"] for n in group.names if f"{prefix}.{n}" in plan}
        if not sizes:
            return []
        check(len(sizes) == 1, f"layers {group.names} of {prefix} share an input but were planned "
                               f"with group sizes {sorted(sizes)}")
        return by_size[sizes.pop()](layer, prefix, group)
    return quantize_group


def weight_args(bits: int, group_size: int, symmetric: bool, act_order: bool) -> dict:
    """The ``weights`` QuantizationArgs of one config group, as compressed-tensors serialises them."""
    args = {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
            "strategy": "group", "dynamic": False}
    if act_order:  # GPTQ visiting columns by decreasing diag(H), groups kept contiguous
        args["actorder"] = "weight"
    return args


def name_pattern(name: str) -> str:
    """A ``re:`` target matching ``name`` with any decoder-layer index (``.3.`` -> ``.\\d+.``)."""
    parts = [r"\d+" if p.isdigit() else re.escape(p) for p in name.split(".")]
    return r"re:(.*\.)?" + r"\.".join(parts) + "$"


def group_targets(groups: list[list[str]], all_linears: list[str]) -> list[list[str]]:
    """Targets per config group: ``["Linear"]`` alone, else name patterns (exact names if ambiguous)."""
    if len(groups) == 1:
        return [["Linear"]]
    targets = [sorted({name_pattern(n) for n in names}) for names in groups]
    for names, pats in zip(groups, targets):
        hits = {n for n in all_linears for p in pats if re.match(p[3:], n)}
        if hits != set(names):
            return [sorted(names) for names in groups]
    return targets


def quantization_config(layers: dict[str, tuple[int, int, bool]], ignore: list[str],
                        all_linears: list[str], act_order: bool) -> dict:
    """The ``quantization_config`` block of config.json.

    ``layers``: quantized Linear name -> ``(bits, group_size, symmetric)``; ``ignore``: the
    Linear layers left unquantized; ``all_linears``: every Linear name in the model.
    """
    keys = sorted(set(layers.values()), key=lambda k: (-k[1], k[0], k[2]))  # largest groups first
    groups = [[n for n, k in layers.items() if k == key] for key in keys]
    targets = group_targets(groups, all_linears)
    config_groups = {
        f"group_{i}": {"format": "pack-quantized", "input_activations": None,
                       "output_activations": None, "targets": t,
                       "weights": weight_args(key[0], key[1], key[2], act_order)}
        for i, (key, t) in enumerate(zip(keys, targets))}
    return {"config_groups": config_groups, "format": "pack-quantized",
            "global_compression_ratio": None, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "moe_sparsity_config": None, "quant_method": COMPRESSED_TENSORS,
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
            "version": CT_VERSION}


def check_single_group_size(model: nn.Module, group_size: int) -> None:
    """One-line error if a ``QuantLinear`` uses another group size than the recipe's (a model
    quantized with ``group_fallback``): the native format records one group size only."""
    from quantsink.weights.linear import QuantLinear

    for name, m in model.named_modules():
        check(not isinstance(m, QuantLinear) or m.group_size == group_size,
              f"{name} uses groups of {getattr(m, 'group_size', 0)}, the recipe {group_size} (quantized "
              f"with group_fallback); the {QUANTSINK} format stores one group size; allowed: "
              f"format={COMPRESSED_TENSORS!r}")
