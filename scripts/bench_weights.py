"""Weight-quantization rows for docs/RESULTS.md (Protocol Q by default), printed as markdown.

RTN, RTN + outliers, GPTQ and GPTQ + outliers at the requested group sizes, plus
bitsandbytes nf4 (``Linear4bit``, blocksize 64) and LLM.int8() (``Linear8bitLt``,
threshold 6.0) when bitsandbytes imports, all on the same evaluation windows in one run.

    python scripts/bench_weights.py                     # Protocol Q: 65,536 tokens, ctx 2048
    python scripts/bench_weights.py --tokens 16384 --groups 128 --outliers 32
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from pathlib import Path

import torch
from torch import nn

import quantsink
from quantsink.data import calibration_windows, eval_tokens
from quantsink.eval import perplexity
from quantsink.weights.linear import QuantLinear

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--eval", default=str(DATA / "wiki.test.raw"))
    p.add_argument("--calib", default=str(DATA / "wiki.train.excerpt-1MB.raw"))
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--groups", type=int, nargs="+", default=[64, 128])
    p.add_argument("--outliers", type=int, default=32)
    p.add_argument("--no-bnb", action="store_true", help="skip the bitsandbytes rows")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args()


def linear_ratio(model: nn.Module) -> float:
    """Stored bytes of the decoder's QuantLinear layers / their fp16 bytes."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    fp16 = sum(2 * m.in_features * m.out_features for m in layers)
    return sum(m.packed_nbytes() for m in layers) / fp16


def ours(base, tok, cal, windows, algorithm: str, group: int, k: int) -> tuple[nn.Module, float]:
    model = copy.deepcopy(base)
    recipe = {"name": f"{algorithm}-g{group}-k{k}",
              "weights": {"algorithm": algorithm, "group_size": group, "outlier_channels": k,
                          "clip_search": algorithm == "gptq"}}  # RTN rows: plain min-max RTN
    quantsink.quantize(model, recipe, calib=windows, calibration=cal, tokenizer=tok, progress=False)
    return model, linear_ratio(model)


def bnb_model(base: nn.Module, kind: str) -> nn.Module:
    """Copy of ``base`` whose decoder Linear layers are bitsandbytes nf4 or int8 modules."""
    import bitsandbytes as bnb

    model = copy.deepcopy(base)
    for name, mod in list(model.model.layers.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight.detach().clone()
        if kind == "nf4":
            new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False,
                                    compute_dtype=torch.float32, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64)
        else:
            new = bnb.nn.Linear8bitLt(mod.in_features, mod.out_features, bias=False,
                                      has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.model.layers.get_submodule(parent), attr, new.to("cpu"))
    return model


def main() -> None:
    args = parse()
    base, tok = quantsink.load_model(args.model)
    ids = eval_tokens(tok, args.eval, args.tokens)
    windows = calibration_windows(tok, args.calib, args.calib_samples, args.calib_seq_len, seed=0)
    cal = quantsink.calibrate(base, tok, windows, progress=not args.quiet)

    def ppl(model: nn.Module, desc: str) -> float:
        return perplexity(model, ids, args.ctx, progress=not args.quiet, desc=desc)["ppl"]

    fp = ppl(base, "fp32")
    rows = [("fp32 (reference)", "-", "-", fp, 0.0, "1.00 (fp32 = 2x)", 0.0)]
    for group in args.groups:
        for algorithm in ("rtn", "gptq"):
            for k in (0, args.outliers):
                t0 = time.perf_counter()
                model, ratio = ours(base, tok, cal, windows, algorithm, group, k)
                secs = time.perf_counter() - t0
                p = ppl(model, f"{algorithm} g{group} k{k}")
                name = f"{algorithm.upper()}{' + outliers' if k else ''} int4"
                rows.append((name, group, k, p, 100 * (p / fp - 1), f"{ratio:.3f}", secs))
    if not args.no_bnb and importlib.util.find_spec("bitsandbytes") is not None:
        for kind, label, ratio in (("nf4", "bitsandbytes nf4", "0.266"),
                                   ("int8", "bitsandbytes LLM.int8() (threshold 6)", "0.5")):
            p = ppl(bnb_model(base, kind), kind)
            rows.append((label, 64 if kind == "nf4" else "row", "-", p, 100 * (p / fp - 1), ratio, 0.0))
    print(f"\nSmolLM2-135M, WikiText-2 test, first {ids.numel()} tokens, ctx {args.ctx}; "
          f"calibration {args.calib_samples}x{args.calib_seq_len} tokens of wiki.train\n")
    print("| weights (decoder Linear) | group | fp16 outlier ch. | ppl | vs fp32 | bytes vs fp16 | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for name, g, k, p, d, ratio, secs in rows:
        print(f"| {name} | {g} | {k} | {p:.3f} | {d:+.1f} % | {ratio} | {secs:.0f} |")


if __name__ == "__main__":
    main()
