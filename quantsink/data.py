"""Calibration and evaluation text: files (.txt/.raw/.jsonl/.parquet) or a dataset name.

``calibration_windows`` draws reproducible token windows; ``eval_tokens`` returns the
leading tokens of a corpus for perplexity.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from quantsink.errors import QuantsinkError, check
from quantsink.io import existing_file, read_text

TEXT_SUFFIXES = (".txt", ".raw", ".text")
ALLOWED = "a .txt/.raw file, a .jsonl file with a 'text' field, a .parquet file, or a dataset name"


def load_text(source: str | Path, what: str = "calibration data") -> str:
    """Read the whole corpus behind ``source`` as one string (``what`` names it in errors)."""
    path = Path(source).expanduser()
    if path.exists() or str(source).endswith(TEXT_SUFFIXES + (".jsonl", ".parquet")):
        text = _read_file(existing_file(path, what, ALLOWED), what)
    else:
        text = _read_dataset(str(source), what)
    check(bool(text.strip()), f"{what} {str(source)!r} is empty; allowed: {ALLOWED}")
    return text


def _read_file(path: Path, what: str) -> str:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return read_text(path, what, ALLOWED)
    if suffix == ".jsonl":
        return _read_jsonl(path, what)
    if suffix == ".parquet":
        return _read_parquet(path, what)
    raise QuantsinkError(f"unsupported {what} file {path.name!r}; allowed: {ALLOWED}")


def _read_jsonl(path: Path, what: str) -> str:
    rows = []
    for n, line in enumerate(read_text(path, what, ALLOWED).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        check(isinstance(row, dict) and isinstance(row.get("text"), str),
              f"{what} {path.name} line {n}: expected a JSON object with a string 'text' field")
        rows.append(row["text"])
    return "\n\n".join(rows)


def _read_parquet(path: Path, what: str) -> str:
    check(importlib.util.find_spec("pyarrow") is not None,
          f"reading {what} {path.name!r} needs pyarrow (pip install 'quantsink[datasets]'); allowed: {ALLOWED}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise QuantsinkError(f"{what} {path.name!r} is not a readable parquet file ({str(exc)[:100]})") from None
    check("text" in table.column_names, f"{what} {path.name!r} has no 'text' column (columns: "
                                        f"{table.column_names[:8]}); allowed: {ALLOWED}")
    return "\n\n".join(str(t) for t in table.column("text").to_pylist() if t)


def _read_dataset(name: str, what: str) -> str:
    check(importlib.util.find_spec("datasets") is not None,
          f"{what} {name!r} is not a file, and reading a dataset by name needs `datasets` "
          "(pip install 'quantsink[datasets]'); allowed: " + ALLOWED)
    import datasets

    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as exc:  # noqa: BLE001  (datasets raises many types; report one line)
        raise QuantsinkError(f"could not load dataset {name!r}: {str(exc).splitlines()[0][:160]}") from None
    check("text" in ds.column_names, f"{what}: dataset {name!r} has no 'text' column")
    return "\n\n".join(t for t in ds["text"] if t)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """All token ids of ``text`` as a 1-D LongTensor (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids.long()


def calibration_windows(tokenizer: Any, source: str | Path, samples: int = 16,
                        seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens, drawn reproducibly from ``source``.

    Returns a LongTensor ``[samples, seq_len]``. Windows start at random positions
    chosen with ``torch.Generator().manual_seed(seed)``.
    """
    check(samples >= 1, f"--calib-samples must be >= 1, got {samples}")
    check(seq_len >= 2, f"--calib-seq-len must be >= 2, got {seq_len}")
    ids = tokenize(tokenizer, load_text(source))
    check(ids.numel() >= seq_len, f"calibration text {str(source)!r} has {ids.numel()} tokens, "
                                  f"shorter than one window of {seq_len}; allowed: a longer text "
                                  "or a smaller --calib-seq-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def eval_tokens(tokenizer: Any, source: str | Path, max_tokens: int | None = None) -> torch.Tensor:
    """The first ``max_tokens`` token ids of ``source`` (all of them when None)."""
    ids = tokenize(tokenizer, load_text(source, "evaluation data"))
    return ids if max_tokens is None else ids[:max_tokens]
