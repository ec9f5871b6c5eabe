"""`quantsink eval`: perplexity of a model, optionally through the sink-aware quantized KV cache."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from quantsink.cli.common import add_model_arg, check_source
from quantsink.errors import check


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="perplexity (optionally with a quantized KV cache)",
                              description="Perplexity over non-overlapping windows (Protocol Q). "
                                          "With --recipe the KV cache is quantized exactly as in "
                                          "generation; without it the model runs unquantized.")
    add_model_arg(p)
    p.add_argument("--recipe", default=None, help="recipe name or YAML with a kv_cache section")
    p.add_argument("--window", type=int, default=None,
                   help="fp16 recent window in tokens, overriding the recipe (0 = none)")
    p.add_argument("--calibration", default=None,
                   help="a calibration artifact directory (from `quantsink inspect`): its sink map "
                        "(positional and content sinks) replaces the recipe's first num_sinks positions")
    p.add_argument("--data", required=True, help="evaluation text (e.g. wiki.test.raw)")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--max-tokens", type=int, default=65536, help="leading tokens used (default 65536)")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from quantsink.data import eval_tokens
    from quantsink.eval import perplexity
    from quantsink.models import load_model

    check(args.ctx >= 2, f"--ctx must be >= 2, got {args.ctx}")
    check(args.max_tokens >= args.ctx, f"--max-tokens {args.max_tokens} is shorter than one window "
                                       f"(--ctx {args.ctx}); allowed: >= --ctx")
    check_source(args.data, "--data")
    json_out = Path(args.json) if args.json else None
    check(json_out is None or (json_out.parent.is_dir() and not json_out.is_dir()),
          f"--json {args.json!r}: the file's directory must exist and the path must not be a directory")
    check(json_out is None or os.access(json_out.parent, os.W_OK),
          f"--json {args.json!r}: its directory is not writable; allowed: a writable location")
    kv = _kv_config(args.recipe, args.window)
    check(args.calibration is None or kv is not None, "--calibration needs --recipe (it sets the KV sinks)")
    sink_map = None
    if args.calibration is not None:
        from quantsink.calibration import CalibrationResult

        sink_map = CalibrationResult.load(args.calibration).sink_map
    model, tok = load_model(args.model)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    check(context is None or args.ctx <= context,
          f"--ctx {args.ctx} is longer than the model's context of {context} tokens; allowed: <= {context}")
    ids = eval_tokens(tok, args.data, args.max_tokens)
    check(ids.numel() >= args.ctx, f"--data {args.data} has {ids.numel()} tokens, fewer than one window of "
                                   f"--ctx {args.ctx}; allowed: a longer text or a smaller --ctx")
    result = perplexity(model, ids, args.ctx, progress=not args.no_progress, kv=kv, sink_map=sink_map)
    result.update(window=kv.window if kv is not None else 0, recipe=args.recipe, model=args.model,
                  ctx=args.ctx)
    print(f"ppl {result['ppl']:.4f}  tokens {result['tokens']}  kv_avg_bits {result['kv_avg_bits']:.3f}"
          f"  window {result['window']}")
    if json_out is not None:  # written beside the target, then renamed: never half-written
        tmp = json_out.with_name(f".{json_out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, json_out)
    return 0


def _kv_config(recipe: str | None, window: int | None):
    """The recipe's KVConfig with ``--window`` applied (validated again), or None."""
    check(recipe is not None or window is None, "--window needs --recipe (the unquantized model has no window)")
    if recipe is None:
        return None
    from quantsink.kv.cache import resolve_kv_config

    kv = resolve_kv_config(recipe)
    if window is not None:
        kv = dataclasses.replace(kv, window=window)  # re-runs the KVConfig checks
    return kv
