"""Public verbs: ``quantize(model, recipe, calib=...)`` and ``load(dir)``.

``quantize`` draws calibration windows, runs the calibration of
:mod:`quantsink.calibration` (sink map, massive activations) when it is available,
swaps the embedding / lm_head for int8 rows when the recipe asks for it, replaces every
decoder Linear by a :class:`~quantsink.weights.linear.QuantLinear` and every MoE experts
module by a :class:`~quantsink.weights.experts.QuantExperts`, layer by layer (their forwards
run the exact float32 reference meanwhile), rounds the remaining floating-point tensors to
fp16 (the precision they are exported in, so the exported checkpoint reproduces the
in-memory model exactly), and records everything in ``model.config.quantization_config``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsink.checks import check_finite_weights, check_seq_len
from quantsink.config import Recipe, load_recipe, to_dict
from quantsink.errors import QuantsinkError, check
from quantsink.hf.support import check_supported
from quantsink.weights.backend import use_backend
from quantsink.weights.coverage import check_ignore, check_outlier_channels, check_quantizable, float_report
from quantsink.weights.experts_quant import make_experts_quantizer
from quantsink.weights.groups import is_ignored
from quantsink.weights.layer import make_group_quantizer, static_groups
from quantsink.weights.runtime import check_embeddings, prepare_model, quantize_embeddings
from quantsink.weights.sequential import quantize_layers

QUANT_VERSION = 1


def needs_calibration(recipe: Recipe) -> bool:
    """True when the weight section needs activation statistics (GPTQ or outlier channels)."""
    w = recipe.weights
    return w is not None and (w.algorithm == "gptq" or w.outlier_channels > 0 or w.scale_search)


def check_not_quantized(model: Any) -> None:
    """Refuse a model loaded from a quantized checkpoint (re-quantizing packed or int weights)."""
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    check(qc is None, f"the model is already quantized (quantization_config with quant_method "
                      f"{str(getattr(method, 'value', method))!r}); allowed: the original floating-point model")


def check_model_layout(model: Any, recipe: Recipe) -> list:
    """What :func:`check_model` can tell from the model's config, module names and shapes alone
    (a meta-device skeleton is enough): already quantized, unsupported, ``ignore`` entries that
    name nothing, more outlier channels than a layer can keep. Returns the layers' plans."""
    check(not getattr(model, "quantsink_report", None), "this model is already quantized")
    check_not_quantized(model)
    check_supported(model)  # one line, before any work, for models quantsink cannot run
    plans = check_quantizable(model)
    if recipe.weights is not None:
        check_ignore(model, recipe.weights.ignore)
        check_outlier_channels(model, plans, recipe.weights.outlier_channels, recipe.weights.ignore)
        check_embeddings(model, recipe.weights.embedding_bits, recipe.weights.lm_head_bits)
    return plans


def check_model(model: Any, recipe: Recipe) -> None:
    """Everything about ``model`` that would make ``recipe`` fail or guess, before any work:
    :func:`check_model_layout`, then non-finite weights and, with ``scale_search``, norms the
    scales cannot be folded into."""
    check_model_layout(model, recipe)
    check_finite_weights(model)
    if recipe.weights is not None and recipe.weights.scale_search:
        from quantsink.hf.fold import check_foldable

        check_foldable(model)


def _windows(model: Any, calib: Any, tokenizer: Any, recipe: Recipe, samples: int | None,
             seq_len: int | None, seed: int | None) -> torch.Tensor | None:
    """Calibration windows ``[N, L]`` from a tensor, a path or a dataset name (None when absent);
    windows longer than the model's context are refused."""
    if calib is None:
        return None
    if isinstance(calib, torch.Tensor):
        check(calib.dim() == 2 and not calib.is_floating_point(),
              f"calib tensor must be integer token ids [N, L], got {tuple(calib.shape)} {calib.dtype}")
        check_seq_len(model, calib.shape[1], "calib window length")
        return calib.long()
    check(tokenizer is not None, "calib is text, so quantize() needs tokenizer=...")
    from quantsink.data import calibration_windows

    c = recipe.calibration
    check_seq_len(model, seq_len or c.seq_len, "--calib-seq-len" if seq_len else "calibration.seq_len")
    return calibration_windows(tokenizer, calib, samples or c.samples, seq_len or c.seq_len,
                               c.seed if seed is None else seed)


def _calibration(model: Any, tokenizer: Any, windows: torch.Tensor | None, calibration: Any,
                 progress: bool) -> Any:
    """A ``CalibrationResult`` from an object, an artifact dir, or a fresh run (None without windows)."""
    if calibration is not None and not isinstance(calibration, (str, Path)):
        return calibration
    from quantsink.calibration import CalibrationResult, calibrate

    if calibration is not None:
        path = Path(calibration)
        check(path.is_dir(), f"calibration artifact {str(path)!r} is not a directory; allowed: a "
                             "directory written by CalibrationResult.save")
        return CalibrationResult.load(path)
    if windows is None:
        return None
    return calibrate(model, tokenizer, windows, samples=windows.shape[0],
                     seq_len=windows.shape[1], progress=progress)


def massive_channels(cal: Any, limit: int | None = None) -> list[int]:
    """Residual channels flagged as massive activations, largest magnitude first (unique).

    ``limit`` keeps only the ``limit`` strongest ones.
    """
    if cal is None:
        return []
    best: dict[int, float] = {}
    for row in getattr(cal, "massive", []):
        c, v = int(row["channel"]), abs(float(row.get("value", 0.0)))
        best[c] = max(best.get(c, 0.0), v)
    ranked = sorted(best, key=lambda c: (-best[c], c))
    return ranked if limit is None else ranked[:limit]


@torch.no_grad()
def round_float_tensors_to_fp16(model: nn.Module) -> None:
    """Round every floating parameter to the fp16 grid (dtype kept); buffers such as RoPE's
    ``inv_freq`` are not saved, so they stay exact."""
    for t in model.parameters():
        if t.is_floating_point() and t.dtype != torch.float16 and t.numel() > 1:
            t.copy_(t.half().to(t.dtype))


def _quant_config(recipe: Recipe, cal: Any, modules: list[str]) -> Any:
    from quantsink.weights.hf_quantizer import QuantsinkConfig

    sink_map = getattr(cal, "sink_map", None)
    return QuantsinkConfig(
        version=QUANT_VERSION,
        weights=None if recipe.weights is None else to_dict(recipe.weights),
        kv_cache=None if recipe.kv_cache is None else to_dict(recipe.kv_cache),
        sink_map=None if sink_map is None else sink_map.to_dict(),
        modules=modules, recipe=recipe.name)


def quantize(model: Any, recipe: Any, calib: Any = None, calibration: Any = None,
             tokenizer: Any = None, progress: bool = True, *, samples: int | None = None,
             seq_len: int | None = None, seed: int | None = None, format: str = "quantsink",
             drop_outliers: bool = False, group_fallback: bool = False) -> Any:
    """Quantize ``model`` in place following ``recipe`` and return it.

    ``calib``: a LongTensor ``[N, L]`` of windows, or a text path / dataset name (needs
    ``tokenizer``); ``calibration``: a ``CalibrationResult`` or a directory saved from one.
    ``samples``/``seq_len``/``seed`` override the recipe's calibration section.
    ``format``: the checkpoint format the result is meant for, ``"quantsink"`` or
    ``"compressed-tensors"`` (pure int grids: no fp16 outlier channels, which the recipe may only
    ask for with ``drop_outliers``; whole groups, or ``group_fallback`` for layers the recipe's
    group size does not divide; see :mod:`quantsink.weights.compressed_tensors`).
    The per-module report is left in ``model.quantsink_report``.
    """
    # --- checkpoint format (compressed-tensors: issue #12) ---
    from quantsink.weights.compressed_tensors import COMPRESSED_TENSORS, plan_group_sizes, recipe_for_format

    recipe = recipe_for_format(load_recipe(recipe), format, drop_outliers, group_fallback)
    check_model(model, recipe)
    plan = None
    if format == COMPRESSED_TENSORS:
        plan = plan_group_sizes(model, recipe.weights, group_fallback)
    # --- end checkpoint format ---
    windows = _windows(model, calib, tokenizer, recipe, samples, seq_len, seed)
    cal = _calibration(model, tokenizer, windows, calibration, progress)
    check_calibration_data(recipe, windows, cal)
    apply_recipe(model, recipe, windows, cal, progress, plan)
    from quantsink.weights.hf_quantizer import attach_kv_generate

    prepare_model(model)  # the kernels the exported checkpoint will pick on reload
    attach_kv_generate(model)
    return model


quantize_ = quantize


def check_calibration_data(recipe: Recipe, windows: torch.Tensor | None, cal: Any) -> None:
    """One line when the recipe needs calibration data that neither ``windows`` nor ``cal`` has."""
    wcfg = recipe.weights
    if needs_calibration(recipe) and windows is None:
        stats = getattr(cal, "stats", None) or {}
        check(wcfg.algorithm == "rtn" and not wcfg.scale_search
              and any(k.startswith("act_absmax/") for k in stats),
              f"recipe {recipe.name!r} (weights.algorithm={wcfg.algorithm}, outlier_channels="
              f"{wcfg.outlier_channels}, scale_search={wcfg.scale_search}) needs calibration data; "
              "allowed: --calib PATH (or calib=...), or --calibration ARTIFACT for rtn recipes")


def apply_recipe(model: Any, recipe: Recipe, windows: torch.Tensor | None, cal: Any, progress: bool,
                 plan: dict | None = None, store: Any = None) -> None:
    """The quantization itself, after the calibration: int8 embedding / lm_head rows, every
    decoder layer (``store``: a :class:`~quantsink.weights.sequential.LayerStore`), the rest
    rounded to fp16, ``quantization_config`` and ``model.quantsink_report``."""
    wcfg = recipe.weights
    reports: list[dict] = []
    embeddings: list[dict] = []
    if wcfg is not None:
        embeddings = quantize_embeddings(model, wcfg.embedding_bits, wcfg.lm_head_bits)
        with use_backend("reference"):
            reports = _quantize_weights(model, wcfg, windows, cal, progress, plan, store)
    round_float_tensors_to_fp16(model)
    modules = list(dict.fromkeys(r.get("module", r["name"]) for r in reports))  # experts: once
    model.config.quantization_config = _quant_config(recipe, cal, modules)
    model.quantsink_report = {"modules": reports, "embeddings": embeddings,
                              "massive_channels": massive_channels(cal, 8),
                              **_scale_report(wcfg, reports),
                              "calibration_windows": None if windows is None else list(windows.shape),
                              **(float_report(model) if wcfg is not None else {})}
    model.quantsink_calibration = cal


def _quantize_weights(model: Any, wcfg: Any, windows: torch.Tensor | None, cal: Any,
                      progress: bool, plan: dict | None = None, store: Any = None) -> list[dict]:
    """Every decoder Linear and MoE experts module quantized, layer by layer; the reports.

    ``plan``: per-layer group sizes of a compressed-tensors export (no outlier channels);
    ``store``: where streamed layers come from (:mod:`quantsink.weights.streaming`).
    """
    forced = massive_channels(cal, limit=wcfg.outlier_channels // 4)
    if plan is None:
        group_q = make_group_quantizer(wcfg, forced, _hidden_size(model))
    else:  # compressed-tensors: per-layer group sizes, no outliers
        from quantsink.weights.compressed_tensors import group_quantizer

        group_q = group_quantizer(wcfg, plan, _hidden_size(model))
    experts_q = make_experts_quantizer(wcfg, forced, _hidden_size(model))
    static = static_groups(cal) if windows is None else None
    prepare = _layer_scaler(model, wcfg, forced, plan) if wcfg.scale_search else None
    return quantize_layers(model, windows, group_q, static_stats=static,
                           hessian=wcfg.algorithm == "gptq" or wcfg.scale_search, progress=progress,
                           quantize_experts=experts_q, prepare_layer=prepare, store=store)


def _layer_scaler(model: Any, wcfg: Any, forced: list[int], plan: dict | None) -> Any:
    """The AWQ-style scale search callback, with each group's own grid (plan group sizes for CT)."""
    from quantsink.weights.layer import make_search_quantizer
    from quantsink.weights.scale_search import make_layer_scaler

    def group_size(prefix: str, names: list[str]) -> int:
        sizes = {plan[f"{prefix}.{n}"] for n in names if f"{prefix}.{n}" in plan}
        check(len(sizes) == 1, f"{prefix}: layers {names} share an input but have group sizes {sorted(sizes)}")
        return sizes.pop()

    if plan is None:
        quantizer_for = make_search_quantizer(wcfg, forced, _hidden_size(model))
    else:  # compressed-tensors: no outliers, no forced channels
        quantizer_for = make_search_quantizer(wcfg, [], _hidden_size(model), group_size)

    return make_layer_scaler(model, wcfg.scale_grid, quantizer_for, tuple(wcfg.scale_stats),
                             lambda name: is_ignored(name, wcfg.ignore))


def _scale_report(wcfg: Any, reports: list[dict]) -> dict:
    """``scale_search``: the alpha chosen per searched group (empty without the option)."""
    if wcfg is None or not wcfg.scale_search:
        return {}
    from quantsink.weights.scale_search import scale_summary

    return {"scale_search": scale_summary(reports)}


def _hidden_size(model: Any) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.hidden_size)


def load(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """Load a quantsink checkpoint directory: ``(model, tokenizer)`` with ``QuantLinear`` layers.

    ``model.generate`` builds the checkpoint's sink-aware KV cache when no
    ``past_key_values`` is passed (see :mod:`quantsink.weights.hf_quantizer`).
    """
    from quantsink.models import load_model

    path = Path(path)
    check(path.is_dir() and (path / "config.json").is_file(),
          f"{str(path)!r} is not a checkpoint directory; allowed: a directory written by quantsink quantize")
    model, tok = load_model(str(path), device=device)
    if getattr(model, "quantization_method", None) != "quantsink":
        raise QuantsinkError(f"{str(path)!r} is not a quantsink checkpoint (no quantization_config "
                             "with quant_method 'quantsink')")
    return model, tok
