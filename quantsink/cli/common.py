"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse

from quantsink.errors import check
from quantsink.models import DEFAULT_MODEL

MAX_SAMPLES = 4096  # calibration windows; more than GPTQ's usual 128 x 2,048 tokens is a typo


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"alias, .gguf file, HF directory or hub id (default: {DEFAULT_MODEL})")


def add_calib_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--calib", required=required, help="calibration text: file path or dataset name")
    p.add_argument("--calib-samples", type=int, default=None,
                   help=f"number of windows, 1..{MAX_SAMPLES} (default: the recipe's, 16)")
    p.add_argument("--calib-seq-len", type=int, default=None,
                   help="tokens per window, 2..the model's context (default: the recipe's, 512)")
    p.add_argument("--seed", type=int, default=None, help="seed for drawing windows (default: the recipe's, 0)")


def check_calib_args(args: argparse.Namespace) -> None:
    """Bounds of the calibration arguments, before any model is loaded (the model's context
    length is checked once it is known)."""
    if args.calib_samples is not None:
        check(1 <= args.calib_samples <= MAX_SAMPLES,
              f"--calib-samples must be in 1..{MAX_SAMPLES}, got {args.calib_samples}")
    if args.calib_seq_len is not None:
        check(args.calib_seq_len >= 2, f"--calib-seq-len must be >= 2, got {args.calib_seq_len}")
    if args.calib is not None:
        check_source(args.calib, "--calib")


def check_source(source: str, flag: str) -> None:
    """A text source must be an existing file or (no path separator, no suffix) a dataset name."""
    from pathlib import Path

    from quantsink.data import ALLOWED, TEXT_SUFFIXES

    looks_like_path = "/" in source or "\\" in source or source.endswith(TEXT_SUFFIXES + (".jsonl", ".parquet"))
    if looks_like_path or Path(source).exists():
        from quantsink.io import existing_file

        existing_file(source, f"{flag} file", ALLOWED)
