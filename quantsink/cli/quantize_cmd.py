"""`quantsink quantize`: quantize a model with a recipe and export a checkpoint directory.

    quantsink quantize [--model M] --recipe NAME|file.yaml [--calib PATH]
                       [--calibration ARTIFACT] --out DIR [--force] [--eval PATH]
                       [--format quantsink|compressed-tensors] [--drop-outliers] [--group-fallback]
                       [--stream [--resume] [--device cpu|cuda]]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from quantsink.cli.common import add_calib_args, add_model_arg, check_calib_args, check_source


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="quantize a model with a recipe and export it",
                              description="Quantize a model (weights and/or KV cache recipe) and "
                                          "write a checkpoint that from_pretrained reloads.")
    add_model_arg(p)
    p.add_argument("--recipe", required=True, help="recipe name (e.g. int4-sink) or a YAML file")
    add_calib_args(p)
    p.add_argument("--calibration", default=None,
                   help="a calibration artifact directory (from `quantsink calibrate`)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--eval", default=None, metavar="PATH",
                   help="text to measure perplexity on before and after quantization")
    p.add_argument("--eval-tokens", type=int, default=65536, help="tokens of --eval (default 65536)")
    p.add_argument("--eval-ctx", type=int, default=2048, help="window length for --eval (default 2048)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_format_args(p)
    add_stream_args(p)
    p.set_defaults(run=run)


def add_stream_args(p: argparse.ArgumentParser) -> None:
    """``--stream``, ``--resume``, ``--device`` (models bigger than memory, issue #12)."""
    p.add_argument("--stream", action="store_true",
                   help="quantize layer by layer from the safetensors on disk (for models bigger "
                        "than memory): only the layer being quantized is in memory; finished layers "
                        "go to OUT.partial/; same checkpoint bytes as without --stream")
    p.add_argument("--resume", action="store_true",
                   help="with --stream: continue the killed run left in OUT.partial/ (same model, "
                        "recipe and calibration), giving the same bytes as an uninterrupted run")
    p.add_argument("--device", default="cpu",
                   help="with --stream: cpu (default) or cuda, where the current layer is "
                        "calibrated and quantized")


def add_format_args(p: argparse.ArgumentParser) -> None:
    """``--format`` and the compressed-tensors options (issue #12)."""
    from quantsink.weights.compressed_tensors import CT_GROUP_SIZES, FORMATS

    p.add_argument("--format", default=FORMATS[0], choices=FORMATS,
                   help="checkpoint format: quantsink (default; fp16 outlier channels, needs `import "
                        "quantsink`) or compressed-tensors (pack-quantized int weights that "
                        "transformers and vLLM load without quantsink)")
    p.add_argument("--drop-outliers", action="store_true",
                   help="compressed-tensors only: quantize the recipe's fp16 outlier channels as well "
                        "(without it such a recipe is refused)")
    p.add_argument("--group-fallback", action="store_true",
                   help="compressed-tensors only: layers whose input width the recipe's group size "
                        f"does not divide get the largest of {list(CT_GROUP_SIZES)} that does")


def _ppl(model, ids, ctx: int, progress: bool, desc: str) -> float:
    from quantsink.eval import perplexity

    return perplexity(model, ids, ctx, progress=progress, desc=desc)["ppl"]


def _load_calibration(path: str | None):  # noqa: ANN202
    """The ``--calibration`` artifact, read (and checked) before the model loads."""
    if path is None:
        return None
    from quantsink.calibration import CalibrationResult

    return CalibrationResult.load(path)


def _check_args(args: argparse.Namespace):  # noqa: ANN202
    """The recipe, once every argument is checked (output, recipe, calibration, eval, --model
    not an export): one line before any weights load."""
    from quantsink.config import load_recipe
    from quantsink.errors import check
    from quantsink.weights.api import needs_calibration
    from quantsink.weights.checkpoint import check_not_quantized_dir
    from quantsink.weights.compressed_tensors import recipe_for_format
    from quantsink.weights.shards import check_out_dir

    check_out_dir(args.out, args.force)  # before any heavy work
    _check_stream_args(args)
    recipe = recipe_for_format(load_recipe(args.recipe), args.format, args.drop_outliers,
                               args.group_fallback)
    check_calib_args(args)
    check(args.eval_ctx >= 2, f"--eval-ctx must be >= 2, got {args.eval_ctx}")
    if args.eval:
        check_source(args.eval, "--eval")
    check(not needs_calibration(recipe) or args.calib or args.calibration,
          f"recipe {recipe.name!r} needs calibration data; allowed: --calib PATH (a text file or "
          "dataset name) or --calibration ARTIFACT")
    check(args.eval_tokens >= args.eval_ctx, f"--eval-tokens={args.eval_tokens} is shorter than "
                                             f"--eval-ctx={args.eval_ctx}; allowed: >= --eval-ctx")
    check_not_quantized_dir(args.model)
    return recipe


def run(args: argparse.Namespace) -> int:
    # MKL's results may depend on memory alignment; conditional numerical reproducibility
    # makes two runs with the same seed byte-identical (read at MKL's first call).
    os.environ.setdefault("MKL_CBWR", "AUTO")
    from quantsink.data import eval_tokens
    from quantsink.models import load_model
    from quantsink.weights.api import quantize
    from quantsink.weights.compressed_tensors import COMPRESSED_TENSORS
    from quantsink.weights.export import export
    from quantsink.weights.summary import build_report, format_summary

    recipe = _check_args(args)  # everything about the arguments, before any model is loaded
    calibration = _load_calibration(args.calibration)
    progress = not args.quiet
    t0 = time.perf_counter()
    if args.stream:
        return _run_streamed(args, recipe, progress, t0)
    model, tok = load_model(args.model)
    ids = eval_tokens(tok, args.eval, args.eval_tokens) if args.eval else None
    ppl_before = _ppl(model, ids, args.eval_ctx, progress, "ppl fp") if ids is not None else None
    t1 = time.perf_counter()
    quantize(model, recipe, calib=args.calib, calibration=calibration, tokenizer=tok,
             progress=progress, samples=args.calib_samples, seq_len=args.calib_seq_len,
             seed=args.seed, format=args.format, group_fallback=args.group_fallback)
    seconds = time.perf_counter() - t1
    ppl_after = _ppl(model, ids, args.eval_ctx, progress, "ppl quant") if ids is not None else None
    n_eval = None if ids is None else ids.numel()
    report = build_report(model, recipe, ppl_before, ppl_after, n_eval)
    out = export(model, tok, args.out, recipe, report=report, force=args.force, format=args.format)
    print(format_summary(report, out, time.perf_counter() - t0))
    print(f"quantization (calibration included) took {seconds:.1f} s")
    if args.format == COMPRESSED_TENSORS:
        print(f"{COMPRESSED_TENSORS} pack-quantized checkpoint: AutoModelForCausalLM.from_pretrained"
              f"({str(out)!r}) needs no quantsink; serve with `vllm serve {out}`")
    return 0


def _check_stream_args(args: argparse.Namespace) -> None:
    from quantsink.errors import check

    for flag, used in (("--resume", args.resume), ("--device", args.device != "cpu")):
        check(args.stream or not used, f"{flag} works with --stream only; allowed: --stream {flag} ..., "
                                       f"or no {flag}")
    if args.stream:
        from quantsink.weights.streaming import check_device, check_stream_format, stream_source

        check_stream_format(args.format)
        check(not args.eval, "--eval needs the whole model in memory, so it does not work with --stream; "
                             "allowed: `quantsink eval` on the written checkpoint")
        check_device(args.device)
        stream_source(args.model)


def _run_streamed(args: argparse.Namespace, recipe, progress: bool, t0: float) -> int:
    from quantsink.cli import Terminated
    from quantsink.weights.resume import work_dir_for
    from quantsink.weights.streaming import quantize_streaming
    from quantsink.weights.summary import format_summary

    try:
        out, report = quantize_streaming(args.model, recipe, args.out, calib=args.calib,
                                         calibration=args.calibration, samples=args.calib_samples,
                                         seq_len=args.calib_seq_len, seed=args.seed,
                                         resume=args.resume, force=args.force, device=args.device,
                                         progress=progress, format=args.format)
    except (KeyboardInterrupt, Terminated) as exc:
        work = work_dir_for(args.out)
        if work.is_dir():
            sys.stderr.write(f"quantsink: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}, "
                             f"--out was not written; the finished layers are kept in {str(work)!r}: "
                             "the same command with --resume continues\n")
            return 143 if isinstance(exc, Terminated) else 130
        raise
    print(format_summary(report, out, time.perf_counter() - t0))
    return 0
