"""The checkpoint writer every format shares: the output-directory check, the tensors of a model
as a checkpoint stores them, the shard plan (sorted names, a new shard past ``max_bytes``) and
the sharded safetensors + index writer, whole tensors or read shard by shard (streaming)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from quantsink._fs import check_target
from quantsink.errors import check

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
