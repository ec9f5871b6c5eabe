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
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from quantsink._fs import check_target, staged_dir
from quantsink.errors import QuantsinkError, check

SHARD_BYTES = 64 * 2**20


def check_out_dir(out: str | Path, force: bool) -> Path:
    """Validate the output path before any work: not a file; not an existing dir unless ``force``,
    and with ``force`` only a previous quantsink checkpoint (never the working directory)."""
    out = Path(out)
    check_target(out)
    check(not (out.exists() and not out.is_dir()),
          f"--out {str(out)!r} is an existing file; allowed: a new directory, or an existing "
          "directory with --force")
    check(not out.exists() or force, f"--out {str(out)!r} already exists; allowed: a new directory, "
                                     "or --force to replace it")
    check(not out.exists() or not any(out.iterdir()) or _is_checkpoint(out),
          f"--out {str(out)!r} is not a quantsink checkpoint, so --force will not replace it; allowed: "
          "a new directory, an empty one, or a previous `quantsink quantize` output")
    check(out.parent.exists() if str(out.parent) else True,
          f"the parent directory of --out {str(out)!r} does not exist; allowed: an existing parent")
    return out


def _is_checkpoint(path: Path) -> bool:
    """A directory written by ``quantsink quantize`` (its report file is the marker)."""
    return (path / "quantsink_report.json").is_file()


def export_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor as the checkpoint stores it: floats other than fp16 -> fp16, on the CPU, contiguous."""
    if t.is_floating_point() and t.dtype != torch.float16:
        t = t.half()
    return t.detach().cpu().contiguous()


def checkpoint_tensors(model: torch.nn.Module, skip: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors to save: state dict, tied duplicates removed, floats other than fp16 -> fp16.

    ``skip``: leave out the names starting with it (a streamed export's decoder layers).
    """
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if skip is not None and name.startswith(skip):
            continue
        if t.data_ptr() in seen and t.numel() > 0:
            continue  # a tied weight (lm_head = embed_tokens)
        seen.add(t.data_ptr())
        tensors[name] = export_tensor(t)
    return tensors


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names by shard: sorted by name, a new shard once ``max_bytes`` would be passed."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(sizes):
        if shards[-1] and size + sizes[name] > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += sizes[name]
    return shards


def _test_pause() -> None:
    """Testing only: ``QUANTSINK_TEST_EXPORT_DELAY=<seconds>`` sleeps after each shard, so that the
    signal tests (tests/test_bad_input_signals.py) interrupt an export half-way. Not a user setting."""
    delay = os.environ.get("QUANTSINK_TEST_EXPORT_DELAY")
    if delay:
        time.sleep(float(delay))


def write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_bytes: int = SHARD_BYTES) -> int:
    """Write sharded safetensors + index into ``folder``; returns the total tensor bytes."""
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    return write_planned_shards(sizes, lambda names: {n: tensors[n] for n in names}, folder, max_bytes)


def write_planned_shards(sizes: dict[str, int], read: Callable[[list[str]], dict[str, torch.Tensor]],
                         folder: Path, max_bytes: int = SHARD_BYTES) -> int:
    """:func:`write_shards` for tensors known by their byte sizes and read shard by shard
    (``read(names)`` returns them as :func:`export_tensor` makes them); the same files."""
    shards = plan_shards(sizes, max_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        shard = read(names)
        shard = {n: shard[n] for n in names}
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        del shard
        _test_pause()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


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
    # --- checkpoint format (compressed-tensors: issue #12) ---
    from quantsink.weights.compressed_tensors import (COMPRESSED_TENSORS, check_format,
                                                      check_single_group_size)

    if check_format(format) == COMPRESSED_TENSORS:
        from quantsink.weights.ct_export import export_compressed

        return export_compressed(model, tokenizer, out, report, force, max_shard_bytes)
    qc = getattr(model.config, "quantization_config", None)
    weights = (qc.to_dict() if hasattr(qc, "to_dict") else (qc or {})).get("weights") or {}
    if weights:
        check_single_group_size(model, int(weights["group_size"]))
    # --- end checkpoint format ---
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
