"""`quantsink inspect`: find attention sinks and massive activations, write a report.

    quantsink inspect --calib wiki.train.raw --out report/

prints a table and writes ``report/report.json``, the calibration artifact
(``calibration.json`` + ``stats.safetensors``, reusable by ``quantize --calibration``) and PNGs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from quantsink.cli.common import add_calib_args, add_model_arg, check_calib_args

DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 512


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="find attention sinks and massive activations; write report.json and PNGs",
        description="Run a calibration pass and report attention sinks and massive activations.")
    add_model_arg(p)
    add_calib_args(p, required=True)
    p.add_argument("--out", required=True,
                   help="report directory (new, empty, or a previous report; replaced as a whole)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="write the PNG figures (default: yes)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar (default: yes)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from quantsink.calibration import calibrate
    from quantsink.calibration.report import check_output_dir, format_table, write_report_dir
    from quantsink.models import load_model

    check_calib_args(args)
    samples = DEFAULT_SAMPLES if args.calib_samples is None else args.calib_samples
    seq_len = DEFAULT_SEQ_LEN if args.calib_seq_len is None else args.calib_seq_len
    seed = 0 if args.seed is None else args.seed
    out = Path(args.out)
    check_output_dir(out)  # fail before the pass, not after it
    model, tokenizer = load_model(args.model)
    result = calibrate(model, tokenizer, args.calib, samples=samples, seq_len=seq_len, seed=seed,
                       progress=args.progress, name=args.model)
    written = write_report_dir(result, out, plots=args.plots)
    print(format_table(result))
    print(f"\nwrote {out}/: " + ", ".join(p.name for p in written))
    return 0
