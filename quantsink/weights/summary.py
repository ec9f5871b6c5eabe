"""The quantization report (``quantsink_report.json``) and the summary table the CLI prints."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from quantsink.config import to_dict
from quantsink.hf.arch import head_dim


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def build_report(model: Any, recipe: Any, ppl_before: float | None = None,
                 ppl_after: float | None = None, eval_tokens: int | None = None) -> dict:
    """A JSON-serialisable report of a model quantized by :func:`quantsink.quantize` (no timings)."""
    rep = getattr(model, "quantsink_report", None) or {"modules": []}
    mods = rep["modules"]
    fp16 = sum(m["fp16_bytes"] for m in mods)
    packed = sum(m["packed_bytes"] for m in mods)
    outlier_bytes = sum(2 * m["out"] * m["outliers"] * m.get("experts", 1) for m in mods)
    sink_map = (model.config.quantization_config.to_dict() or {}).get("sink_map")
    return {
        "recipe": recipe.name, "weights": None if recipe.weights is None else to_dict(recipe.weights),
        "kv_cache": None if recipe.kv_cache is None else to_dict(recipe.kv_cache),
        "kv_cache_notes": [] if recipe.kv_cache is None else recipe.kv_cache.notes(head_dim(model)),
        "quantized_linear_layers": sum(1 for m in mods if m.get("kind") != "experts"),
        "quantized_experts_modules": len({m["module"] for m in mods if m.get("kind") == "experts"}),
        "experts": experts_rows(mods),
        "decoder_float_fraction": rep.get("decoder_float_fraction"),
        "decoder_matrix_elements": rep.get("decoder_matrix_elements"),
        "float_matrices": rep.get("float_matrices", []),
        "linear_fp16_bytes": fp16, "linear_packed_bytes": packed,
        "linear_ratio_vs_fp16": round(packed / fp16, 4) if fp16 else None,
        "linear_ratio_without_outliers": round((packed - outlier_bytes) / fp16, 4) if fp16 else None,
        "outlier_channels_total": sum(m["outliers"] for m in mods),
        "embeddings": rep.get("embeddings", []),
        "massive_channels": rep.get("massive_channels", []),
        "sink_positions": (sink_map or {}).get("positional"),
        "content_sink_token_ids": (sink_map or {}).get("content_token_ids"),
        "calibration_windows": rep.get("calibration_windows"),
        "ppl_before": ppl_before, "ppl_after": ppl_after, "eval_tokens": eval_tokens,
    }


def _embeddings(rows: list[dict]) -> str:
    if not rows:
        return "floating point"
    tied = " (tied: one set of rows)" if any(r["tied"] for r in rows) else ""
    names = ", ".join(r["name"] for r in rows)
    return f"int8 rows: {names}{tied}, {_fmt_bytes(sum(r['packed_bytes'] for r in rows))}"


def experts_rows(modules: list[dict]) -> list[dict]:
    """Per MoE experts module: tokens routed to each expert and the experts that fell back to RTN."""
    keys = ("module", "routed_tokens", "rtn_fallback", "gptq_failed", "min_tokens")
    return [{k: m[k] for k in keys} for m in modules if "rtn_fallback" in m]


def dir_bytes(path: Path) -> int:
    """Total size of the files in ``path``."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def _moe_rows(report: dict) -> list[tuple[str, Any]]:
    rows = []
    if report.get("experts"):
        fell = sum(len(r["rtn_fallback"]) for r in report["experts"])
        total = sum(len(r["routed_tokens"] or []) for r in report["experts"])
        rows.append(("quantized MoE experts modules", f"{report['quantized_experts_modules']} "
                     f"({total} experts; {fell} fell back to RTN: < {report['experts'][0]['min_tokens']} "
                     "routed tokens or no GPTQ factorisation, see quantsink_report.json)"))
    if report.get("decoder_float_fraction") is not None:
        kept = len(report["float_matrices"])
        rows.append(("decoder matrix elements in floating point", f"{100 * report['decoder_float_fraction']:.2f} % "
                     f"(fp16 outlier channels + {kept} matrices kept whole: routers, ignored)"))
    return rows


def format_summary(report: dict, out: Path, seconds: float) -> str:
    """A two-column markdown table of the report, the checkpoint size and the wall time."""
    rows = [("recipe", report["recipe"]),
            ("quantized Linear layers", report["quantized_linear_layers"]),
            ("Linear weights fp16", _fmt_bytes(report["linear_fp16_bytes"])),
            ("Linear weights packed", f"{_fmt_bytes(report['linear_packed_bytes'])} "
                                      f"({report['linear_ratio_vs_fp16']}x fp16; "
                                      f"{report['linear_ratio_without_outliers']}x without outliers)"),
            ("fp16 outlier channels (all layers)", report["outlier_channels_total"]),
            ("embedding / lm_head", _embeddings(report.get("embeddings") or [])),
            *_moe_rows(report),
            ("massive-activation channels", report["massive_channels"] or "-"),
            ("sink positions", report["sink_positions"] if report["sink_positions"] is not None
             else "- (no calibration)"),
            *(("KV cache at this head_dim", note) for note in report.get("kv_cache_notes", [])),
            ("checkpoint on disk", _fmt_bytes(dir_bytes(out))),
            ("wall time", f"{seconds:.1f} s")]
    if report["ppl_before"] is not None:
        delta = 100 * (report["ppl_after"] / report["ppl_before"] - 1)
        rows.append((f"ppl before -> after ({report['eval_tokens']} tokens)",
                     f"{report['ppl_before']:.3f} -> {report['ppl_after']:.3f} ({delta:+.2f} %)"))
    lines = [f"| {'item':<36} | value |", f"|{'-' * 38}|-------|"]
    lines += [f"| {k:<36} | {v} |" for k, v in rows]
    return f"wrote {out}\n" + "\n".join(lines)
