"""The calibration artifact: ``calibration.json`` (sink map, massive activations, settings)
plus ``stats.safetensors`` (per-channel statistics for the quantizers). No pickle anywhere.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantsink._fs import default_permissions
from quantsink.calibration.sinkmap import SinkMap
from quantsink.errors import QuantsinkError, check

ARTIFACT_VERSION = 1
JSON_NAME = "calibration.json"
STATS_NAME = "stats.safetensors"


@dataclass
class CalibrationResult:
    """What a calibration pass found.

    ``stats`` keys (all float32): ``act_absmax/<linear name>`` [in_features] (read by the
    weight quantizer); for reports and figures, ``attn_mass/<layer>`` [H, P] (share of
    attention on each leading position per head), ``learned_sink_mass/<layer>`` [H] (share
    of attention the model's learned sink logits take, per head; layers with learned sinks
    only), ``resid_absmax/<layer>`` [hidden], ``key_absmax/<layer>`` [Hkv, D] (max |key|
    after RoPE with the sinks excluded) and ``key_lead_absmax/<layer>`` [P, Hkv, D].
    ``massive`` rows: ``{"layer", "channel", "value", "ratio_to_median", "positions", ...}``.
    ``meta``: settings of the pass (windows, thresholds, source).
    """

    model: str
    sink_map: SinkMap
    massive: list[dict]
    stats: dict[str, torch.Tensor]
    num_layers: int = 0
    meta: dict = field(default_factory=dict)

    def layer_stat(self, kind: str, layer: int) -> torch.Tensor:
        """``stats[f"{kind}/{layer}"]`` with a clear error when absent."""
        key = f"{kind}/{layer}"
        check(key in self.stats, f"calibration has no statistic {key!r}")
        return self.stats[key]

    def to_json(self) -> dict:
        """The JSON part of the artifact."""
        return {"version": ARTIFACT_VERSION, "model": self.model, "num_layers": self.num_layers,
                "sink_map": self.sink_map.to_dict(), "massive": self.massive, "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        """Write ``calibration.json`` and ``stats.safetensors`` into directory ``path``.

        Files are written into a temporary directory first and then renamed into place, so
        a reader never sees a half-written artifact.
        """
        from safetensors.torch import save_file

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".calib-", dir=target.parent))
        try:
            tensors = {k: v.detach().float().cpu().clone() for k, v in self.stats.items()}  # no shared storage
            save_file(tensors, str(tmp / STATS_NAME), metadata={"version": str(ARTIFACT_VERSION)})
            (tmp / JSON_NAME).write_text(json.dumps(self.to_json(), indent=1, allow_nan=False), encoding="utf-8")
            default_permissions(tmp, 0o777)
            for name in (STATS_NAME, JSON_NAME):
                default_permissions(tmp / name, 0o666)
            if not target.exists():
                os.replace(tmp, target)
            else:
                check(target.is_dir(), f"calibration output {str(target)!r} exists and is not a directory")
                os.replace(tmp / STATS_NAME, target / STATS_NAME)
                os.replace(tmp / JSON_NAME, target / JSON_NAME)  # the JSON is the commit marker
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationResult":
        """Read an artifact written by :meth:`save` (a directory, or its ``calibration.json``).

        Every file is checked: a missing, non-UTF-8, truncated or garbage file, a missing sink
        map and a NaN/Inf statistic are one line each."""
        root = Path(path)
        if root.is_file() and root.name == JSON_NAME:
            root = root.parent
        check(root.is_dir(), f"calibration artifact {str(path)!r} is not a directory; allowed: {_ALLOWED}")
        check((root / JSON_NAME).is_file(), f"{str(path)!r} is not a calibration artifact (no {JSON_NAME}); "
                                            f"allowed: {_ALLOWED}")
        meta = _read_meta(root / JSON_NAME)
        check((root / STATS_NAME).is_file(), f"{str(root)!r} has {JSON_NAME} but no {STATS_NAME}; allowed: "
                                             f"{_ALLOWED}")
        stats = _read_stats(root / STATS_NAME)
        try:
            return cls(model=str(meta.get("model", "")), sink_map=SinkMap.from_dict(meta["sink_map"]),
                       massive=list(meta.get("massive", [])), stats=stats,
                       num_layers=int(meta.get("num_layers", 0)), meta=dict(meta.get("meta", {})))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, QuantsinkError):
                raise QuantsinkError(f"{root / JSON_NAME}: {exc}") from None
            raise QuantsinkError(f"{root / JSON_NAME}: malformed ({exc}); allowed: {_ALLOWED}") from None


_ALLOWED = f"a directory with {JSON_NAME} and {STATS_NAME} written by `quantsink inspect`"


def _read_meta(path: Path) -> dict:
    """``calibration.json``: UTF-8 JSON, the supported version, a sink map."""
    from quantsink.io import read_json

    meta = read_json(path, "calibration file", _ALLOWED)
    version = meta.get("version") if isinstance(meta, dict) else None
    check(version == ARTIFACT_VERSION, f"{path}: calibration version {version!r} is not supported; "
                                       f"allowed: {ARTIFACT_VERSION}")
    check(isinstance(meta.get("sink_map"), dict), f"{path}: no sink map (the 'sink_map' object is missing); "
                                                  f"allowed: {_ALLOWED}")
    return meta


def _read_stats(path: Path) -> dict[str, torch.Tensor]:
    """``stats.safetensors``: intact, and every statistic finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from quantsink.checks import check_finite_tensors
    from quantsink.io import check_safetensors

    check_safetensors(path, "calibration statistics")
    try:
        stats = load_file(str(path))
    except SafetensorError as exc:
        raise QuantsinkError(f"{path}: unreadable ({exc}); allowed: {_ALLOWED}") from None
    check_finite_tensors(stats.items(), f"calibration statistic in {path}", "finite statistics (re-run "
                         "`quantsink inspect` on a model whose forward stays finite)")
    return stats
