"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse

from quantsink.models import DEFAULT_MODEL


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"alias, .gguf file, HF directory or hub id (default: {DEFAULT_MODEL})")


def add_calib_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--calib", required=required, help="calibration text: file path or dataset name")
    p.add_argument("--calib-samples", type=int, default=None, help="number of windows (default 16)")
    p.add_argument("--calib-seq-len", type=int, default=None, help="tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing windows (default 0)")
