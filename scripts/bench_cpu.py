#!/usr/bin/env python
"""CPU decode benchmark: fp32 / bf16 (DynamicCache) vs the int4-sink export, written to docs/BENCHMARKS.md.

Rows per (context, batch, threads): ``fp32`` and ``bf16`` (the base model, DynamicCache),
``int4-sink`` (the export with its own SinkQuantCache, as ``generate`` builds it) and
``int4-sink weights`` (the export with a DynamicCache: the weight kernels alone). Each row
runs in a fresh subprocess: random prompt ``[batch, context]``, one prefill
(``logits_to_keep=1``), then a manual loop ``model(input_ids=..., past_key_values=cache,
use_cache=True)`` of greedy steps. Memory = peak RSS minus the RSS right after importing
torch, transformers (+ the Llama modeling code) and quantsink.

    python scripts/bench_cpu.py --checkpoint out/            # full grid: ctx 512/2048/8192, batch 1/8, 1 and all threads
    python scripts/bench_cpu.py --checkpoint out/ --quick    # smoke run: ctx 512/2048, batch 1, 1 thread, 8 steps
    python scripts/bench_cpu.py --checkpoint out/ --contexts 2048 --batches 1 --threads 1 2

``--isa avx512|avx2|portable`` forces quantsink's CPU kernel level (``QUANTSINK_CPU_ISA``);
with ``avx2`` torch's own dense ops are held to AVX2 too (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``: an honest AVX2 baseline on an
AVX-512 host). These must be set before torch starts, so the script re-executes itself with
them. Every row records the level it ran (``isa`` column: quantsink level / torch capability).

``--checkpoint`` is an ``int4-sink`` export (``quantsink quantize --recipe int4-sink ... --out
out/``). Each layer shape's kernel is also timed against dense ``F.linear`` (``--no-kernels``
skips it). On a CUDA machine (``--device cuda``) the same rows run on the GPU (fp16 instead of
bf16) and the W4A16 kernel is timed against dense fp16.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- bench_cpu:begin -->", "<!-- bench_cpu:end -->"
VARIANTS = ("fp32", "bf16", "int4-sink", "int4-sink weights")
ISA_ENV = {  # --isa: the environment of the whole run (set before torch is imported)
    "avx512": {"QUANTSINK_CPU_ISA": "avx512"},
    "avx2": {"QUANTSINK_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "portable": {"QUANTSINK_CPU_ISA": "portable"}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="an int4-sink export directory")
    p.add_argument("--model", default="smollm2-135m", help="the unquantized model (alias or dir)")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 and all cores")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--prefill-chunk", type=int, default=-1,
                   help="feed the prompt in chunks of this many tokens (0: one forward; default: as "
                        "generate does, one forward with a DynamicCache, chunks of 256 with the sink cache)")
    p.add_argument("--quick", action="store_true", help="ctx 512/2048, batch 1, 1 thread, 8 steps")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--timeout", type=int, default=3600, help="seconds per row")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="skip (ctx, batch) cells with more than this many prompt tokens (listed as not run)")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each layer shape's kernel against dense F.linear")
    p.add_argument("--doc", type=Path, default=DOC, help="markdown file whose CPU section is replaced")
    p.add_argument("--isa", choices=tuple(ISA_ENV), default=None,
                   help="force the CPU kernel level (and, for avx2, torch's dense ops to AVX2)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.contexts, a.batches, a.threads, a.steps, a.warmup = [512, 2048], [1], [1], 8, 2
    a.threads = sorted(set(a.threads or [1, os.cpu_count() or 1]))
    return a


# -- worker (one row, fresh process) -----------------------------------------------------
def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(spec: dict) -> dict:
    import warnings

    import torch

    torch.set_num_threads(spec["threads"])
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401  (part of "importing transformers")
    from transformers import AutoModelForCausalLM, DynamicCache

    import quantsink  # noqa: F401  (registers the checkpoint's quant_method)

    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values -> cache rename
    base, dev, variant = _rss_mb(), torch.device(spec["device"]), spec["variant"]
    half = torch.bfloat16 if dev.type == "cpu" else torch.float16
    t0 = time.perf_counter()
    if variant.startswith("int4"):
        model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"]).to(dev).eval()
    else:
        dtype = torch.float32 if variant == "fp32" else half
        model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=dtype).to(dev).eval()
    load_s, load_mb = time.perf_counter() - t0, _rss_mb() - base
    if variant == "int4-sink":
        from quantsink.weights.hf_quantizer import build_sink_cache

        cache = build_sink_cache(model)  # SinkQuantCache.from_recipe(model, kv_cache, sink_map)
    else:
        cache = DynamicCache(config=model.config)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (spec["batch"], spec["context"]), generator=g)
    res = _decode(model, cache, prompt.to(dev), spec["warmup"], spec["steps"], spec["chunk"])
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _peak_mb() - base
    return {**spec, **res, "load_s": load_s, "load_mb": load_mb, "peak_mb": peak,
            "linear_ms": _linear_ms(model, spec["batch"], dev), "kernels": _kernels(model), "isa": _isa()}


def _isa() -> str:
    """The path of this row: quantsink's CPU kernel level / torch's CPU capability."""
    import torch

    from quantsink.kernels import cpu_ext

    level = cpu_ext.selected_level() if cpu_ext.available() else "none"
    return f"{level} / {torch.backends.cpu.get_cpu_capability()}"


def _linear_ms(model, batch: int, dev) -> float:
    """One decode step of the weight products alone: every Linear of the model (lm_head too)
    on a random ``[batch, in]`` row (siblings of one parent with the same input width get the
    same tensor, as q/k/v and gate/up do); the fastest of 10 passes (ms)."""
    import torch

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    mods, xs, shared = [], [], {}
    for parent in model.modules():
        for m in parent.children():
            if type(m).__name__ in ("Linear", "QuantLinear", "Int8LMHead"):
                key = (id(parent), m.in_features)
                if key not in shared:
                    shared[key] = torch.randn(batch, m.in_features, device=dev, dtype=dtype)
                mods.append(m)
                xs.append(shared[key])
    times = []
    with torch.no_grad():
        for _ in range(11):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for m, x in zip(mods, xs):
                m(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return 1e3 * min(times[1:])


def _decode(model, cache, prompt, warmup: int, steps: int, chunk: int) -> dict:
    import torch

    def sync() -> None:
        if prompt.device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        t0 = time.perf_counter()
        for c0 in range(0, prompt.shape[1], chunk or prompt.shape[1]):
            ids = prompt[:, c0:c0 + (chunk or prompt.shape[1])]
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        sync()
        prefill_s = time.perf_counter() - t0
        times = []
        for _ in range(warmup + steps):
            t1 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            sync()
            times.append(time.perf_counter() - t1)
    step = sorted(times[warmup:])[steps // 2]  # median: robust to other processes' bursts
    return {"prefill_s": prefill_s, "tok_s": prompt.shape[0] / step, "ms_per_step": 1e3 * step}


def _kernels(model) -> str:
    from collections import Counter

    c = Counter(getattr(m, "kernel", None) or type(m).__name__ for m in model.modules()
                if type(m).__name__ in ("QuantLinear", "Int8LMHead"))
    fused = sum(1 for m in model.modules() if type(m).__name__ == "QuantLinear"
                and m._plan is not None and m._plan.fused)
    text = ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))
    return (text + (f" ({fused} fused)" if fused else "")) or "-"


# -- parent ------------------------------------------------------------------------------
def run_row(spec: dict, timeout: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    cmd = [sys.executable, __file__, "--checkpoint", spec["checkpoint"], "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {**spec, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1][len("RESULT "):])


def base_dir(model: str) -> str:
    """The unquantized model's safetensors directory (a GGUF alias is converted once)."""
    from quantsink.models import _gguf_to_hf, _local_path

    path = _local_path(model)
    return str(_gguf_to_hf(path) if path is not None and path.is_file() else path or model)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_rows(checkpoint: str, device: str) -> list[str]:
    """Per layer shape (layer 0 and the lm_head): the packed module vs dense ``F.linear``.

    CPU: one thread, fastest of 30 calls, dense fp32 and bf16 weights; CUDA: fp16 model,
    ``triton.testing.do_bench`` median, dense fp16.
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    import quantsink  # noqa: F401

    from quantsink.weights.fusion import fuse_siblings
    from quantsink.weights.runtime import prepare_model

    cuda = device == "cuda"
    torch.set_num_threads(1)
    dtype = torch.float16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    prepare_model(model, fuse=False)  # each layer alone first
    layer0 = model.model.layers[0]
    mods = [(n, m) for n, m in layer0.named_modules()
            if type(m).__name__ == "QuantLinear"] + [("lm_head", model.lm_head)]
    dense = ("fp16",) if cuda else ("fp32", "bf16")
    rows = [f"| layer | out x in | rows | packed us (kernel) | {' | '.join(f'dense {d} us' for d in dense)} "
            f"| speedup vs {dense[0]} |", "|---|---|---|---|" + "---|" * len(dense) + "---|"]
    with torch.no_grad():
        for name, mod in mods:
            w = (mod.rows if hasattr(mod, "rows") else mod).dequantize().to(device)
            ws = [w.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[d])
                  for d in dense]
            for m in (1, 8):
                x = torch.randn(m, w.shape[1], device=device, dtype=dtype)
                q = _us(lambda: mod(x), cuda)
                ds = [_us(lambda: F.linear(x.to(wd.dtype), wd), cuda) for wd in ws]
                kind = getattr(mod, "kernel", None) or "int8 rows"
                rows.append(f"| {name} | {w.shape[0]} x {w.shape[1]} | {m} | {q:.0f} ({kind}) | "
                            + " | ".join(f"{d:.0f}" for d in ds) + f" | {ds[0] / q:.2f}x |")
        if not cuda and fuse_siblings(model):
            rows += _fused_rows(layer0, dense, device, dtype)
    return rows


def _fused_rows(layer0, dense: tuple, device: str, dtype) -> list[str]:
    """Fused sibling groups of layer 0: all members on one fresh input (a clone per call)."""
    import torch
    import torch.nn.functional as F

    rows = []
    for names in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  ("mlp.gate_proj", "mlp.up_proj")):
        mods = [layer0.get_submodule(n) for n in names]
        if mods[0]._plan is None or not mods[0]._plan.fused:
            continue  # not fused
        ws = [torch.cat([m.dequantize() for m in mods]).to(
            {"fp32": torch.float32, "bf16": torch.bfloat16}[d]) for d in dense]
        for m in (1, 8):
            x = torch.randn(m, mods[0].in_features, device=device, dtype=dtype)

            def fused_call(x=x, mods=mods):
                xc = x.clone()  # a new tensor: no reuse across calls
                for mod in mods:
                    mod(xc)

            q = _us(fused_call, False)
            ds = [_us(lambda wd=wd: F.linear(x.to(wd.dtype), wd), False) for wd in ws]
            label = " + ".join(n.split(".")[-1] for n in names)
            rows.append(f"| {label} (fused) | {ws[0].shape[0]} x {ws[0].shape[1]} | {m} | {q:.0f} "
                        f"({mods[0].kernel}, one call) | " + " | ".join(f"{d:.0f}" for d in ds)
                        + f" | {ds[0] / q:.2f}x |")
    return rows


def _us(fn, cuda: bool) -> float:
    if cuda:
        from triton.testing import do_bench

        return 1e3 * do_bench(fn, return_mode="median")
    fn()
    best = float("inf")
    for _ in range(30):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return 1e6 * best


def table(results: list[dict]) -> list[str]:
    rows = ["| ctx | batch | threads | model (cache) | prefill s | decode tok/s | ms/step | "
            "x best unquantized | weight products ms/step | peak MB over import | x fp32 memory | "
            "weight kernels | isa (quantsink / torch) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        key = (r["context"], r["batch"], r["threads"])
        peers = {p["variant"]: p for p in results if (p["context"], p["batch"], p["threads"]) == key}
        cache = "SinkQuantCache" if r["variant"] == "int4-sink" else "DynamicCache"
        head = f"| {r['context']} | {r['batch']} | {r['threads']} | {r['variant']} ({cache}) |"
        if "error" in r:
            rows.append(f"{head} {r['error']} | | | | | | | | |")
            continue
        best = max((peers[v]["tok_s"] for v in ("fp32", "bf16") if "tok_s" in peers.get(v, {})),
                   default=float("nan"))
        fp32_mb = peers.get("fp32", {}).get("peak_mb", float("nan"))
        rows.append(f"{head} {r['prefill_s']:.1f} | {r['tok_s']:.1f} | {r['ms_per_step']:.0f} | "
                    f"{r['tok_s'] / best:.2f}x | {r['linear_ms']:.1f} | {r['peak_mb']:.0f} | "
                    f"{r['peak_mb'] / fp32_mb:.2f}x | "
                    f"{r['kernels']} | {r.get('isa', '?')} |")
    return rows


def markdown(results: list[dict], a: argparse.Namespace, cmd: str, kernels: list[str]) -> str:
    import torch
    import transformers

    dev = torch.cuda.get_device_name(0) if a.device == "cuda" else f"{cpu_name()}, {os.cpu_count()} cores"
    lines = [BEGIN, "## CPU decode: int4-sink export vs fp32 / bf16 (`scripts/bench_cpu.py`)", "",
             f"Measured {datetime.date.today().isoformat()} on {dev}; torch {torch.__version__}, "
             f"transformers {transformers.__version__}, Python {platform.python_version()}; "
             f"ISA forced: {a.isa or 'no (best level)'}"
             f"{' (' + ' '.join(f'{k}={v}' for k, v in ISA_ENV[a.isa].items()) + ')' if a.isa else ''}.", "",
             f"```bash\n{cmd}\n```", "",
             *(["**Smoke run (`--quick`)**: few contexts and steps; rerun without `--quick` on a quiet "
                "machine for reference figures.", ""] if a.quick else []),
             f"Random prompt ``[batch, ctx]``, "
             f"{_prefill_words(a.prefill_chunk)}, "
             f"then {a.warmup} untimed + {a.steps} timed "
             "greedy steps of `model(input_ids=..., past_key_values=cache, use_cache=True)` (tok/s "
             "from the median step); one fresh "
             "process per row; memory = peak RSS minus the RSS after importing torch, transformers and "
             "quantsink (on CUDA: `max_memory_allocated`). `int4-sink weights` is the export with a "
             "DynamicCache; `x best unquantized` divides by the faster of fp32 / bf16 in the same "
             "(ctx, batch, threads); `weight products ms/step` runs every Linear (and the lm_head) of "
             "the model once on a random `[batch, in]` row, no attention or cache: the weight "
             "kernels' share of a decode step.", "", *table(results), "",
             *([f"Not run (more than `--max-tokens {a.max_tokens}` prompt tokens): "
                + ", ".join(a.skipped) + ".", ""] if getattr(a, "skipped", None) else [])]
    if kernels:
        how = ("`triton.testing.do_bench` median" if a.device == "cuda"
               else "one thread, fastest of 30 calls")
        lines += [f"Weight kernels per layer shape (layer 0 and the lm_head; {how}):", "", *kernels, ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def _prefill_words(chunk: int) -> str:
    if chunk < 0:
        from quantsink.hf.generate import PREFILL_CHUNK

        return (f"prefilled as `generate` does (one forward with a DynamicCache; chunks of {PREFILL_CHUNK} "
                "tokens with the sink cache, its default `prefill_chunk_size`)")
    return f"prefilled in chunks of {chunk} tokens" if chunk else "one prefill"


def _chunk(variant: str, chunk: int) -> int:
    """Prompt tokens per prefill forward of a row (see ``--prefill-chunk``)."""
    if chunk >= 0:
        return chunk
    from quantsink.hf.generate import PREFILL_CHUNK

    return PREFILL_CHUNK if variant == "int4-sink" else 0


def write_doc(doc: Path, section: str) -> None:
    """Replace the delimited CPU section of ``doc`` (appended when absent); the rest is kept."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text)


def _reexec_with_isa(isa: str) -> None:
    """Run this script again with ``ISA_ENV[isa]`` set (torch reads it at import)."""
    want = ISA_ENV[isa]
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**os.environ, **want})


def main() -> None:
    a = parse_args()
    if a.isa:
        _reexec_with_isa(a.isa)
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(a.worker))), flush=True)
        return
    import torch

    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    base, results, a.skipped = base_dir(a.model), [], []
    for ctx in a.contexts:
        for batch in a.batches:
            if a.max_tokens is not None and ctx * batch > a.max_tokens:
                a.skipped.append(f"ctx {ctx} x batch {batch}")
                continue
            for threads in a.threads:
                for variant in a.variants:
                    spec = dict(variant=variant, context=ctx, batch=batch, threads=threads,
                                steps=a.steps, warmup=a.warmup, chunk=_chunk(variant, a.prefill_chunk),
                                device=a.device, base=base, checkpoint=str(a.checkpoint))
                    r = run_row(spec, a.timeout)
                    results.append(r)
                    print(json.dumps({k: v for k, v in r.items() if k not in ("base", "checkpoint")}),
                          flush=True)
    kernels = kernel_rows(str(a.checkpoint), a.device) if a.kernels else []
    cmd = "python scripts/bench_cpu.py " + " ".join(sys.argv[1:])
    section = markdown(results, a, cmd, kernels)
    write_doc(a.doc, section)
    print(section)


if __name__ == "__main__":
    main()
