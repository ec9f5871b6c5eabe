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

TEXT_SUFFIXES = (".txt", ".raw", ".text")
ALLOWED = "a .txt/.raw file, a .jsonl file with a 'text' field, a .parquet file, or a dataset name"


def load_text(source: str | Path) -> str:
    """Read the whole corpus behind ``source`` as one string."""
    path = Path(source).expanduser()
    if path.is_file():
        text = _read_file(path)
    elif path.exists() or str(source).endswith(TEXT_SUFFIXES + (".jsonl", ".parquet")):
        raise QuantsinkError(f"calibration data {str(source)!r} is not a readable file; allowed: {ALLOWED}")
    else:
        text = _read_dataset(str(source))
    check(bool(text.strip()), f"calibration data {str(source)!r} is empty; allowed: {ALLOWED}")
    return text


def _read_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise QuantsinkError(f"{path.name} line {n}: expected a JSON object with a 'text' "
                                     "field") from None
        return "\n\n".join(rows)
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # optional, comes with `datasets`

        table = pq.read_table(path, columns=["text"])
        return "\n\n".join(str(t) for t in table.column("text").to_pylist() if t)
    raise QuantsinkError(f"unsupported data file {path.name!r}; allowed: {ALLOWED}")


def _read_dataset(name: str) -> str:
    check(importlib.util.find_spec("datasets") is not None,
          f"{name!r} is not a file, and reading a dataset by name needs `datasets` "
          "(pip install 'quantsink[datasets]'); allowed: " + ALLOWED)
    import datasets

    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as exc:  # noqa: BLE001  (datasets raises many types; report one line)
        raise QuantsinkError(f"could not load dataset {name!r}: {str(exc).splitlines()[0][:160]}") from None
    check("text" in ds.column_names, f"dataset {name!r} has no 'text' column")
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
    ids = tokenize(tokenizer, load_text(source))
    return ids if max_tokens is None else ids[:max_tokens]
