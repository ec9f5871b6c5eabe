"""Reports of a calibration: ``report.json``, a terminal table, and a report directory
(JSON + calibration artifact + PNGs) written through a temporary directory and a rename.
"""
from __future__ import annotations

import json
from pathlib import Path

from quantsink._fs import staged_dir
from quantsink.calibration.artifact import JSON_NAME, CalibrationResult
from quantsink.checks import check_finite_json, check_finite_tensors
from quantsink.errors import check

REPORT_NAME = "report.json"


def learned_sink_rows(result: CalibrationResult) -> list[dict]:
    """Per layer with learned sink logits (GPT-OSS): the share of attention they take, per head
    (``mass``, mean over queries and windows) and averaged over heads (``mean``)."""
    rows = []
    for layer in range(result.num_layers):
        mass = result.stats.get(f"learned_sink_mass/{layer}")
        if mass is not None:
            rows.append({"layer": layer, "mean": round(float(mass.mean()), 5),
                         "mass": [round(float(m), 5) for m in mass]})
    return rows


def build_report(result: CalibrationResult) -> dict:
    """The ``report.json`` document (keys of issue #2 plus settings and the plain sink map).

    ``sinks.learned`` lists, per layer with learned sink logits, their share of the attention.
    """
    sm = result.sink_map
    return {
        "model": result.model,
        "num_layers": result.num_layers,
        "sinks": {
            "positional": [{k: r[k] for k in ("position", "layers", "mass")} for r in sm.positional_detail],
            "content": [dict(r) for r in sm.content_detail],
            "learned": learned_sink_rows(result),
        },
        "massive_activations": [dict(r) for r in result.massive],
        "sink_map": {"positional": sm.positional, "content_token_ids": sm.content_token_ids},
        "calibration": {k: v for k, v in result.meta.items() if k != "thresholds"},
        "thresholds": result.meta.get("thresholds", {}),
    }


def layer_ranges(layers: list[int]) -> str:
    """``[2, 3, 4, 7]`` -> ``"2-4,7"``."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(parts) or "-"


def massive_by_channel(massive: list[dict]) -> list[dict]:
    """Massive-activation rows merged per channel, largest first."""
    merged: dict[int, dict] = {}
    for r in massive:
        m = merged.setdefault(r["channel"], {"channel": r["channel"], "layers": [], "value": 0.0,
                                             "ratio": 0.0, "positions": set()})
        m["layers"].append(r["layer"])
        if abs(r["value"]) > abs(m["value"]):
            m["value"] = r["value"]
        m["ratio"] = max(m["ratio"], r["ratio_to_median"])
        m["positions"].update(r["positions"])
    return sorted(merged.values(), key=lambda m: -abs(m["value"]))


def _positions(pos: set[int], limit: int = 6) -> str:
    shown = sorted(pos)[:limit]
    more = f",... ({len(pos)})" if len(pos) > limit else ""
    return ",".join(map(str, shown)) + more


def _sink_line(kind: str, what: str, row: dict) -> str:
    layers = f"{layer_ranges(row['layers'])} ({len(row['layers'])})"
    mean = sum(row["mass"]) / len(row["mass"])
    return f"  {kind:<11}{what:<22}{layers:<26}{mean:.3f}/{max(row['mass']):.3f}"


def format_table(result: CalibrationResult, top: int = 12) -> str:
    """Terminal table of the sinks and massive activations."""
    meta = result.meta
    lines = [f"{result.model}: {result.num_layers} layers, {meta.get('samples', '?')} windows x "
             f"{meta.get('seq_len', '?')} tokens",
             "", "Attention sinks (mass = share of attention, mean/max over heads and queries; learned: "
                 "the model's own sink logits)",
             f"  {'kind':<11}{'where':<22}{'layers':<26}{'mass mean/max':<15}"]
    for r in result.sink_map.positional_detail:
        lines.append(_sink_line("positional", f"position {r['position']}", r))
    for r in result.sink_map.content_detail:
        what = f"{r['token']!r} id {r['token_id']}"
        lines.append(_sink_line("content", what, r) + f"  ({max(r['ratio_to_uniform']):.0f}x uniform)")
    learned = learned_sink_rows(result)
    for r in learned:
        lines.append(f"  {'learned':<11}{'sink logits':<22}{str(r['layer']):<26}{r['mean']:.3f}/"
                     f"{max(r['mass']):.3f}  (per head: {', '.join(f'{m:.2f}' for m in r['mass'][:8])}"
                     f"{', ...' if len(r['mass']) > 8 else ''})")
    if not (result.sink_map.positional_detail or result.sink_map.content_detail or learned):
        lines.append("  (none found)")
    ratio = meta.get("thresholds", {}).get("massive_ratio", 100)
    lines += ["", f"Massive activations (|h| >= {ratio:g} x the layer's median |h|)",
              f"  {'channel':<9}{'layers':<26}{'max |value|':>12}{'x median':>10}  positions"]
    merged = massive_by_channel(result.massive)
    for m in merged[:top]:
        layers = f"{layer_ranges(m['layers'])} ({len(m['layers'])})"
        lines.append(f"  {m['channel']:<9}{layers:<26}{abs(m['value']):>12,.0f}{m['ratio']:>10,.0f}  "
                     f"{_positions(m['positions'])}")
    if len(merged) > top:
        lines.append(f"  ... and {len(merged) - top} more channels (see report.json)")
    if not merged:
        lines.append("  (none found)")
    lines += ["", f"Sink map: positional {result.sink_map.positional}, "
                  f"content token ids {result.sink_map.content_token_ids}"]
    return "\n".join(lines)


def check_output_dir(out: Path) -> None:
    """Refuse to replace a directory that holds anything but a previous report."""
    if not out.exists():
        return
    check(out.is_dir(), f"--out {str(out)!r} is a file; allowed: a new directory, an empty one, "
                        "or a previous report directory")
    entries = list(out.iterdir())
    ours = (out / REPORT_NAME).is_file() or (out / JSON_NAME).is_file()
    check(not entries or ours, f"--out {str(out)!r} is a non-empty directory that is not a quantsink "
                               "report; allowed: a new directory, an empty one, or a previous report")


def check_finite_result(result: CalibrationResult, report: dict | None = None) -> None:
    """Refuse a calibration with a NaN/Inf statistic (named), instead of writing bare NaN."""
    allowed = "a model whose float32 forward stays finite on the calibration data"
    check_finite_tensors(result.stats.items(), "calibration statistic", allowed)
    check_finite_json(result.to_json(), JSON_NAME)
    check_finite_json(report if report is not None else build_report(result), REPORT_NAME)


def write_report_dir(result: CalibrationResult, out: str | Path, plots: bool = True) -> list[Path]:
    """Write ``report.json``, the calibration artifact and (optionally) PNGs into ``out``.

    Everything is written into a temporary sibling directory that then replaces ``out``.
    Returns the paths written.
    """
    out = Path(out)
    check_output_dir(out)
    report = build_report(result)
    check_finite_result(result, report)  # before anything is written
    with staged_dir(out) as tmp:
        result.save(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1, allow_nan=False), encoding="utf-8")
        if plots:
            from quantsink.calibration.plots import write_plots

            write_plots(result, tmp)
        names = sorted(p.name for p in tmp.iterdir())
    return [out / n for n in names]

