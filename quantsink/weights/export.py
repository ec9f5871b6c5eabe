"""Writing a quantized model as a Hugging Face checkpoint directory.

Layout of ``out/``: ``model-0000i-of-0000n.safetensors`` shards and
``model.safetensors.index.json``; ``config.json`` carrying ``quantization_config``
(``quant_method: "quantsink"``); ``generation_config.json``; the tokenizer files; and
``quantsink_report.json``. Floating tensors outside ``QuantLinear`` are stored in fp16
(``quantize`` has already rounded them, so nothing changes). Tied weights are stored once.
Everything is written into a hidden sibling directory that is renamed into place at the
end: an exception halfway leaves no partial ``out/``. No timestamps are written, so the
same model gives byte-identical files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from quantsink._fs import staged_dir
from quantsink.errors import QuantsinkError
from quantsink.weights.compressed_tensors import COMPRESSED_TENSORS, check_format, check_single_group_size
from quantsink.weights.ct_export import export_compressed
from quantsink.weights.shards import SHARD_BYTES, check_out_dir, checkpoint_tensors, write_planned_shards


def _write_config(model: Any, folder: Path) -> None:
    cfg = model.config.to_dict()
    cfg["dtype"] = "float32"  # loads back in float32, as quantize() produced it
    cfg.pop("transformers_version", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        g = gen.to_dict()
        g.pop("transformers_version", None)
        (folder / "generation_config.json").write_text(json.dumps(g, indent=2, sort_keys=True) + "\n")


def export(model: Any, tokenizer: Any, out: str | Path, recipe: Any = None,
           report: dict | None = None, force: bool = False, max_shard_bytes: int = SHARD_BYTES,
           format: str = "quantsink") -> Path:
    """Write ``model`` (quantized by :func:`quantsink.quantize`) and ``tokenizer`` to ``out``.

    ``report`` (JSON-serialisable) is written as ``quantsink_report.json``. ``recipe`` is
    accepted for symmetry with ``quantize`` (the recipe already lives in the model config).
    ``format="compressed-tensors"`` writes a pack-quantized checkpoint that transformers and
    vLLM load without quantsink (:mod:`quantsink.weights.ct_export`; the model must have been
    quantized with ``format="compressed-tensors"``).
    Refuses an existing ``out`` unless ``force``; returns the final directory.
    """
    if check_format(format) == COMPRESSED_TENSORS:
        return export_compressed(model, tokenizer, out, report, force, max_shard_bytes)
    qc = getattr(model.config, "quantization_config", None)
    weights = (qc.to_dict() if hasattr(qc, "to_dict") else (qc or {})).get("weights") or {}
    if weights:
        check_single_group_size(model, int(weights["group_size"]))
    check_out_dir(out, force)  # before any work
    tensors = checkpoint_tensors(model)
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    return write_checkpoint(model, tokenizer, out, sizes, lambda names: {n: tensors[n] for n in names},
                            report, force, max_shard_bytes)


def write_checkpoint(model: Any, tokenizer: Any, out: str | Path, sizes: dict[str, int],
                     read: Callable[[list[str]], dict[str, torch.Tensor]], report: dict | None,
                     force: bool, max_shard_bytes: int = SHARD_BYTES) -> Path:
    """The checkpoint directory of :func:`export`, staged then renamed into place; the tensors
    come shard by shard from ``read`` (see :func:`write_planned_shards`)."""
    out = check_out_dir(out, force)
    try:
        with staged_dir(out) as tmp:
            total = write_planned_shards(sizes, read, tmp, max_shard_bytes)
            _write_config(model, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            rep = {"checkpoint_tensor_bytes": total, **(report or {})}
            (tmp / "quantsink_report.json").write_text(json.dumps(rep, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise QuantsinkError(f"writing the checkpoint to {str(out)!r} failed ({exc}); nothing was "
                             "written; allowed: a writable location with enough free space") from None
    return out
