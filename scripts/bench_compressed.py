"""compressed-tensors W4A16 rows for docs/RESULTS.md (Protocol Q), printed as markdown.

One run, the same 16 x 512 calibration windows (wiki.train.excerpt-1MB.raw, seed 0) for every
row: fp32; quantsink ``int4-sink`` in its native format (weights only: g64 + 16 fp16 outlier
channels); quantsink ``--format compressed-tensors`` GPTQ (symmetric and asymmetric) and RTN at
g128 with ``--group-fallback``; llm-compressor's own ``oneshot`` GPTQ W4A16, run by
``scripts/llmc_oneshot.py`` in llm-compressor's venv with the config groups of the quantsink
checkpoint (same layers, same group sizes). Every compressed-tensors checkpoint is read back from
disk by compressed-tensors' decompressor (max |W - W_quantsink| reported) and, where transformers
5.24 can load it, evaluated as transformers loads it; Protocol Q: the first 65,536 tokens of
wiki.test.raw, ctx 2048, non-overlapping windows.

    OMP_NUM_THREADS=1 nice python scripts/bench_compressed.py --llmc-python /work/venv-llmc/bin/python
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import quantsink
from quantsink.data import calibration_windows, eval_tokens
from quantsink.eval import perplexity
from quantsink.weights.backend import use_backend
from quantsink.weights.ct_export import model_grids
from quantsink.weights.export import export
from quantsink.weights.summary import dir_bytes

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"
CT = "compressed-tensors"
ROWS = ["native", "native-awq", "ct-gptq-sym", "ct-gptq-sym-awq", "ct-gptq-asym", "ct-rtn-sym",
        "ct-rtn-sym-awq", "llmc", "bnb-nf4"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--eval", default=str(DATA / "wiki.test.raw"))
    p.add_argument("--calib", default=str(DATA / "wiki.train.excerpt-1MB.raw"))
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--calib-samples", type=int, default=16, help="windows (16; fewer only for a smoke run)")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--llmc-python", default="/work/venv-llmc/bin/python",
                   help="python of a venv with llmcompressor (skipped when missing)")
    p.add_argument("--work", default=None, help="directory for the checkpoints (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS, help="rows to run (default: all)")
    p.add_argument("--scale-stats", nargs="+", default=["mean"], choices=["mean", "duo", "absmax"],
                   help="weights.scale_stats of the scale-search rows (default: mean)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args()


def ct_readback(out: Path, reference: dict[str, torch.Tensor]) -> float:
    """Max |W_decompressed - W_reference| over the layers, decompressed by compressed-tensors."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name
    from safetensors.torch import load_file

    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    tensors = {k: v for f in sorted(out.glob("model*.safetensors")) for k, v in load_file(str(f)).items()}
    worst = 0.0
    for name, ref in reference.items():
        scheme = next(s for s in qc.config_groups.values()
                      if any(t == "Linear" or match_name(name, t) for t in s.targets))
        sd = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
        sd["weight_scale"] = sd["weight_scale"].float()
        w = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
        worst = max(worst, (w - ref).abs().max().item())
    return worst


def load_ct(out: Path, dequantize: bool) -> torch.nn.Module:
    """The checkpoint as transformers' compressed-tensors integration loads it (fp32)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, **kw).eval()


class Bench:
    """Shared state of one run: base model, windows, calibration, evaluation tokens, rows."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.rows, self.scale_rows = args, [], {}
        self.work = Path(args.work or tempfile.mkdtemp(prefix="bench-ct-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.base, self.tok = quantsink.load_model(args.model)
        self.ids = eval_tokens(self.tok, args.eval, args.tokens)
        self.windows = calibration_windows(self.tok, args.calib, args.calib_samples,
                                           args.calib_seq_len, seed=0)
        self.cal = quantsink.calibrate(self.base, self.tok, self.windows, progress=not args.quiet)
        self.fp = self.ppl(self.base, "fp32")
        self.add("fp32 (reference)", "-", self.fp, None, None, "-")

    def ppl(self, model: torch.nn.Module, desc: str) -> float:
        return perplexity(model, self.ids, self.args.ctx, progress=not self.args.quiet, desc=desc)["ppl"]

    def add(self, name: str, groups: str, ppl: float, mib: float | None, secs: float | None,
            check: str) -> None:
        self.rows.append({"row": name, "groups": groups, "ppl": ppl, "vs_fp32": 100 * (ppl / self.fp - 1),
                          "checkpoint_mib": mib, "quantize_s": secs, "readback": check})
        print(json.dumps(self.rows[-1]), flush=True)

    def quantized(self, recipe, fmt: str) -> tuple[torch.nn.Module, float]:
        model = copy.deepcopy(self.base)
        t0 = time.perf_counter()
        quantsink.quantize(model, recipe, calib=self.windows, calibration=self.cal, tokenizer=self.tok,
                           progress=not self.args.quiet, format=fmt, group_fallback=fmt == CT)
        return model, time.perf_counter() - t0

    def native(self, scale_search: bool = False) -> None:
        recipe = dataclasses.replace(quantsink.load_recipe("int4-sink"), kv_cache=None)
        recipe = dataclasses.replace(recipe, weights=dataclasses.replace(
            recipe.weights, scale_search=scale_search, scale_stats=list(self.args.scale_stats)))
        name = "int4-sink" + ("-awq" if scale_search else "")
        model, secs = self.quantized(recipe, "quantsink")
        out = export(model, self.tok, self.work / name)
        reloaded, _ = quantsink.load(out)
        probe = self.ids[None, :256]
        with torch.no_grad():
            dl = (reloaded(probe).logits - model(probe).logits).abs().max().item()
        self.alphas(name, model)
        self.add(f"quantsink int4-sink, native format (weights only){' + scale search' * scale_search}",
                 "64 (+16 fp16 outlier ch.)", self.ppl(model, name), dir_bytes(out) / 2**20, secs,
                 f"in memory (reloaded by quantsink.load: max|dlogits|={dl:.1e})")

    def alphas(self, name: str, model: torch.nn.Module) -> None:
        """The chosen scale exponents per fold site (printed, and kept for the JSON)."""
        rows = model.quantsink_report.get("scale_search") or []
        if rows:
            self.scale_rows[name] = rows
            by_fold: dict[str, list[str]] = {}
            for r in rows:
                by_fold.setdefault(r["fold"], []).append(f"{r['stat']}:{r['alpha']:g}")
            print(name, "alpha per fold:", json.dumps(by_fold), flush=True)

    def ours(self, name: str, algorithm: str, symmetric: bool, scale_search: bool = False) -> Path:
        w = dict(bits=4, group_size=128, symmetric=symmetric, algorithm=algorithm, outlier_channels=0,
                 scale_search=scale_search, scale_stats=list(self.args.scale_stats))
        model, secs = self.quantized({"name": name, "weights": w}, CT)
        self.alphas(name, model)
        out = export(model, self.tok, self.work / name, format=CT)
        err = ct_readback(out, {n: g.dequantize() for n, g in model_grids(model).items()})
        sizes = sorted({g.group_size for g in model_grids(model).values()}, reverse=True)
        if symmetric:  # the default transformers path; asymmetric + mixed groups it cannot load
            loaded = load_ct(out, dequantize=False)
            probe = self.ids[None, :256]
            with torch.no_grad():
                dl = (loaded(probe).logits - model(probe).logits).abs().max().item()
            model, how = loaded, f"transformers (no quantsink; max|dlogits|={dl:.1e})"
        else:
            how = "in memory (transformers 5.24 cannot load asymmetric mixed groups)"
        self.add(f"quantsink --format {CT} {algorithm.upper()} {'sym' if symmetric else 'asym'}"
                 f"{' + scale search' * scale_search}",
                 "/".join(map(str, sizes)), self.ppl(model, name), dir_bytes(out) / 2**20, secs,
                 f"{how}; ct decompress max|dW|={err:.1e}")
        return out

    def llmc(self, like: Path) -> None:
        if not Path(self.args.llmc_python).is_file():
            print(f"skipping llm-compressor: {self.args.llmc_python} not found")
            return
        src, out = self.work / "fp32-src", self.work / "llmc-gptq-w4a16"
        self.base.save_pretrained(src)
        self.tok.save_pretrained(src)
        torch.save(self.windows, self.work / "windows.pt")
        groups = json.loads((like / "config.json").read_text())["quantization_config"]["config_groups"]
        (self.work / "groups.json").write_text(json.dumps(groups))
        script = Path(__file__).with_name("llmc_oneshot.py")
        t0 = time.perf_counter()
        subprocess.run([self.args.llmc_python, str(script), "--model", str(src), "--windows",
                        str(self.work / "windows.pt"), "--config-groups", str(self.work / "groups.json"),
                        "--out", str(out)], check=True, env={**os.environ, "PYTHONNOUSERSITE": "1"})
        secs = time.perf_counter() - t0
        sizes = sorted({g["weights"]["group_size"] for g in groups.values()}, reverse=True)
        self.add("llm-compressor oneshot GPTQ W4A16 (sym, min-max, actorder static)",
                 "/".join(map(str, sizes)), self.ppl(load_ct(out, dequantize=False), "llmc"), dir_bytes(out) / 2**20,
                 secs, "transformers (no quantsink)")

    def bnb_nf4(self) -> None:
        """bitsandbytes nf4 (blocks of 64, fp32 compute) as transformers loads it on the CPU."""
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        src = self.work / "fp32-src"
        if not src.is_dir():
            self.base.save_pretrained(src)
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_compute_dtype=torch.float32)
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=cfg, device_map="cpu",
                                                     dtype=torch.float32).eval()
        secs = time.perf_counter() - t0
        self.add("bitsandbytes nf4 (decoder Linear; lm_head/embedding fp32)", "64 (nf4 blocks)",
                 self.ppl(model, "nf4"), None, secs, "transformers + bitsandbytes (CPU)")


def main() -> None:
    os.environ.setdefault("MKL_CBWR", "AUTO")
    args = parse()
    with use_backend("reference"):  # quantsink's models in float32, as transformers runs the CT ones
        run(args)


def run(args: argparse.Namespace) -> None:
    bench = Bench(args)
    if "native" in args.rows:
        bench.native()
    if "native-awq" in args.rows:
        bench.native(scale_search=True)
    sym = bench.ours("ct-gptq-sym", "gptq", True) if {"ct-gptq-sym", "llmc"} & set(args.rows) else None
    if "ct-gptq-sym-awq" in args.rows:
        bench.ours("ct-gptq-sym-awq", "gptq", True, scale_search=True)
    if "ct-gptq-asym" in args.rows:
        bench.ours("ct-gptq-asym", "gptq", False)
    if "ct-rtn-sym" in args.rows:
        bench.ours("ct-rtn-sym", "rtn", True)
    if "ct-rtn-sym-awq" in args.rows:
        bench.ours("ct-rtn-sym-awq", "rtn", True, scale_search=True)
    if "llmc" in args.rows:
        bench.llmc(sym)
    if "bnb-nf4" in args.rows:
        bench.bnb_nf4()
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": bench.rows, "scale_search": bench.scale_rows},
                                              indent=2) + "\n")
    print(f"\nSmolLM2-135M, WikiText-2 test, first {bench.ids.numel()} tokens, ctx {args.ctx}; "
          "calibration 16x512 tokens of wiki.train (seed 0), the same windows for every row\n")
    print("| weights (decoder Linear) | group size | ppl | vs fp32 | checkpoint MiB | quantize s | evaluated as |")
    print("|---|---|---|---|---|---|---|")
    for r in bench.rows:
        mib = "-" if r["checkpoint_mib"] is None else f"{r['checkpoint_mib']:.1f}"
        secs = "-" if r["quantize_s"] is None else f"{r['quantize_s']:.0f}"
        print(f"| {r['row']} | {r['groups']} | {r['ppl']:.3f} | {r['vs_fp32']:+.2f} % | {mib} | {secs} "
              f"| {r['readback']} |")


if __name__ == "__main__":
    main()
