#!/usr/bin/env python
"""Protocol Q perplexity of a quantsink export through each weight path, one process.

``reference``: the exact float32 torch reference (``use_backend("reference")``); ``auto``: the
kernels picked at load (the C++ W4A32 kernel for decode-sized calls, bf16 tiles + GEMM for more
rows, int8 rows for the lm_head); ``cpu`` / ``int4pack``: that kernel for every call, whatever
its rows (the decode kernels on every token of the window).
Protocol Q: the first 65,536 tokens of wiki.test.raw, non-overlapping 2,048-token windows.

    OMP_NUM_THREADS=1 python scripts/ppl_weight_paths.py out/
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

import quantsink  # noqa: F401  (registers quant_method "quantsink")
from quantsink.data import eval_tokens
from quantsink.eval import perplexity
from quantsink.weights import backend, cpu_w4
from quantsink.weights.backend import use_backend

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def run(path: str, ids: torch.Tensor, ctx: int, mode: str) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if mode == "reference":
        with use_backend("reference"):
            return perplexity(model, ids, ctx, progress=False)["ppl"]
    if mode in ("cpu", "int4pack"):
        owner, name = (cpu_w4, "W4_MAX_ROWS") if mode == "cpu" else (backend, "INT4PACK_MAX_ROWS")
        saved = getattr(owner, name)
        setattr(owner, name, 1 << 20)
        try:
            with use_backend(mode):
                return perplexity(model, ids, ctx, progress=False)["ppl"]
        finally:
            setattr(owner, name, saved)
    return perplexity(model, ids, ctx, progress=False)["ppl"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--modes", nargs="+", default=["reference", "auto", "cpu"],
                   choices=["reference", "auto", "cpu", "int4pack"])
    a = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers import AutoTokenizer

    ids = eval_tokens(AutoTokenizer.from_pretrained(a.checkpoint), a.data, a.tokens)
    results = {}
    for mode in a.modes:
        t = time.time()
        results[mode] = run(a.checkpoint, ids, a.ctx, mode)
        print(f"{mode}: ppl {results[mode]:.4f} ({time.time() - t:.0f} s)", flush=True)
    if "reference" in results:
        for mode, ppl in results.items():
            print(f"{mode} vs reference: {100 * (ppl / results['reference'] - 1):+.3f} %")


if __name__ == "__main__":
    main()
