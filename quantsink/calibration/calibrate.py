"""``calibrate``: one pass over calibration windows that finds sinks (positional, content and
the model's own learned sinks) and massive activations, and gathers the per-channel input
maxima the weight quantizer reads (``act_absmax``) plus what the reports and figures show.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from quantsink.calibration.artifact import CalibrationResult
from quantsink.calibration.collect import Collector, attached
from quantsink.calibration.detect import (Thresholds, find_content_sinks, find_positional_sinks,
                                          leading_prefix)
from quantsink.calibration.sinkmap import SinkMap
from quantsink.checks import check_finite_weights, check_seq_len
from quantsink.data import calibration_windows
from quantsink.errors import check
from quantsink.hf.arch import decoder_layers, decoder_stack, model_device, text_config
from quantsink.hf.support import check_supported
from quantsink.weights.coverage import check_quantizable

# Budget for one layer's attention probabilities ([B, H, L, L] float32) per forward pass.
_ATTN_BYTES = 32 * 2**20


def calibrate(model: Any, tokenizer: Any, calib: str | Path | torch.Tensor, samples: int = 16,
              seq_len: int = 512, seed: int = 0, progress: bool = True, *,
              thresholds: Thresholds | None = None, name: str | None = None) -> CalibrationResult:
    """Run the calibration pass of ``model`` over ``calib``.

    ``calib`` is a text file / dataset name (``samples`` windows of ``seq_len`` tokens are
    drawn with ``seed``) or a LongTensor ``[N, L]`` of windows. ``name`` is recorded as the
    model name (default: the model's ``name_or_path``).
    """
    check_supported(model)  # one line for layouts and attention quantsink cannot run
    check_quantizable(model)  # the statistics are for the weight quantizer: same rule
    check_seq_len(model, calib.shape[-1] if isinstance(calib, torch.Tensor) else seq_len)
    check_finite_weights(model)
    windows = _windows(tokenizer, calib, samples, seq_len, seed)
    th = thresholds or Thresholds()
    cfg = text_config(model)
    vocab = max(int(cfg.vocab_size), int(windows.max()) + 1)
    collector = Collector(len(decoder_layers(model)[1]), vocab, th)
    batch = max(1, min(8, _ATTN_BYTES // (4 * cfg.num_attention_heads * windows.shape[1] ** 2)))
    device = model_device(model)
    stack = decoder_stack(model)  # the decoder without the LM head: no [B, L, vocab] logits
    with attached(model, collector), torch.no_grad():
        for start in tqdm(range(0, windows.shape[0], batch), desc="calibrate", disable=not progress,
                          unit="batch", leave=False):
            ids = windows[start:start + batch]
            collector.begin_batch(ids)
            stack(input_ids=ids.to(device), use_cache=False)
    source = "tensor" if isinstance(calib, torch.Tensor) else str(calib)
    meta = {"source": source, "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "seed": seed, "thresholds": th.to_dict()}
    return finalize(collector, tokenizer, name or str(getattr(model, "name_or_path", "")), meta)


def _windows(tokenizer: Any, calib: str | Path | torch.Tensor, samples: int, seq_len: int,
             seed: int) -> torch.Tensor:
    if isinstance(calib, torch.Tensor):
        check(calib.dim() == 2 and calib.shape[0] >= 1 and calib.shape[1] >= 2,
              f"calibration windows must be a LongTensor [N, L] with N >= 1, L >= 2; got {tuple(calib.shape)}")
        check(not calib.is_floating_point(), "calibration windows must hold integer token ids")
        return calib.long().cpu()
    return calibration_windows(tokenizer, calib, samples, seq_len, seed)


def finalize(col: Collector, tokenizer: Any, model_name: str, meta: dict) -> CalibrationResult:
    """Turn the accumulated statistics into a :class:`CalibrationResult`."""
    th, layers = col.th, range(col.num_layers)
    check(all(col.lead_sum[l] is not None for l in layers),
          "calibration saw no attention (the model does not use the transformers AttentionInterface)")
    lead_mass = torch.stack([col.lead_sum[l] / col.windows for l in layers])  # [layers, H, P]
    fraction = col.lead_hits[:, :lead_mass.shape[-1]] / col.windows
    distinct = col.lead_distinct()[:, :lead_mass.shape[-1]]
    pos_rows = find_positional_sinks(lead_mass.mean(1), col.seq_len, th, fraction, distinct,
                                     min_distinct=min(2, col.windows))
    decode = (lambda t: tokenizer.decode([t])) if tokenizer is not None else (lambda t: f"<id {t}>")
    content_rows = find_content_sinks(col.ratio_sum, col.mass_sum, col.token_windows, th, decode)
    sink_map = SinkMap(positional=leading_prefix(pos_rows),
                       content_token_ids=[r["token_id"] for r in content_rows],
                       num_layers=col.num_layers, positional_detail=pos_rows, content_detail=content_rows)
    stats = {f"act_absmax/{k}": v.clone() for k, v in col.act_absmax.items()}  # q/k/v shared one
    for l in layers:
        stats[f"key_absmax/{l}"] = col.keys[l].finalize(sink_map.positional)
        stats[f"attn_mass/{l}"] = lead_mass[l].float()
        if col.sink_sum[l] is not None:
            stats[f"learned_sink_mass/{l}"] = (col.sink_sum[l] / col.windows).float()
        stats[f"resid_absmax/{l}"] = col.resid_absmax[l].float()
        stats[f"key_lead_absmax/{l}"] = col.keys[l].lead_absmax()
    medians = [sum(m) / len(m) for m in col.medians]
    meta = dict(meta, layer_median_abs=[round(m, 5) for m in medians])
    return CalibrationResult(model=model_name, sink_map=sink_map, massive=_massive_rows(col, medians),
                             stats=stats, num_layers=col.num_layers, meta=meta)


def _massive_rows(col: Collector, medians: list[float]) -> list[dict]:
    """Massive activations merged over batches, by layer then by decreasing magnitude."""
    rows = []
    for (layer, ch), e in col.massive.items():
        positions = sorted(e["positions"])
        rows.append({"layer": layer, "channel": ch, "value": round(e["value"], 3),
                     "ratio_to_median": round(abs(e["value"]) / max(medians[layer], 1e-30), 1),
                     "positions": positions[:col.th.max_positions], "num_positions": len(positions),
                     "occurrences": e["occurrences"], "token_ids": sorted(e["token_ids"])[:32]})
    rows.sort(key=lambda r: (r["layer"], -abs(r["value"])))
    return rows
