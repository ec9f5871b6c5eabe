"""Quality benchmark: writes docs/RESULTS.md (Protocol Q perplexity, KV recipes, StreamingLLM).

    python scripts/bench_quality.py --section kv --max-tokens 65536
    python scripts/bench_quality.py --section streaming --stream-tokens 20000
    python scripts/bench_quality.py --section all

Every measured row is stored in ``docs/results/quality.json`` as soon as it is done, so a
long run can be resumed (rows already present are skipped unless ``--redo``) and sections
can be run separately; the markdown is re-rendered from everything stored. A ``weights``
section is run by ``scripts/bench_weights.py`` when that script exists (it must expose
``rows(args) -> list[dict]`` with the same keys as the KV rows).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from quantsink.data import eval_tokens
from quantsink.eval import perplexity
from quantsink.kv.cache import SinkQuantCache, resolve_kv_config
from quantsink.models import load_model
from quantsink.hf.forward import cache_kwargs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
KV_RECIPES = ("kv-int4-sink", "kv-int4", "kv-int2-sink", "kv-int2")


def kv_rows(args: argparse.Namespace) -> list[tuple[str, dict | None]]:
    """(row name, KV overrides or None for the unquantized model), most important first."""
    rows: list[tuple[str, dict | None]] = [("fp32 (no KV quantization)", None)]
    for name in KV_RECIPES:
        rows.append((f"{name}, no window", {"recipe": name, "window": 0}))
    rows.append(("kv-int2-sink without sinks, no window", {"recipe": "kv-int2-sink", "window": 0, "num_sinks": 0}))
    rows.append(("kv-int2 + 4 fp16 sinks, no window", {"recipe": "kv-int2", "window": 0, "num_sinks": 4}))
    rows.append(("kv-int2-sink + calibrated content sinks, no window",
                 {"recipe": "kv-int2-sink", "window": 0, "content_sinks": True}))
    rows.append(("kv-int2-sink without key outliers, no window",
                 {"recipe": "kv-int2-sink", "window": 0, "key_outliers": 0}))
    rows.append(("kv-int2-sink without rotation, no window", {"recipe": "kv-int2-sink", "window": 0, "rotate": False}))
    for name in KV_RECIPES:
        rows.append((f"{name}, window 128", {"recipe": name}))
    return rows


def run_kv(args: argparse.Namespace, store: dict, model, tok) -> None:
    ids = eval_tokens(tok, args.data, args.max_tokens)
    for name, spec in kv_rows(args):
        key = f"kv/{args.max_tokens}/{name}"
        if (key in store and not args.redo) or not any(o in name for o in args.only):
            continue
        kv = sink_map = None
        if spec is not None:
            spec = dict(spec)
            kv = dataclasses.replace(resolve_kv_config(spec.pop("recipe")), **spec)
            sink_map = content_sink_map(args, model, tok, kv) if kv.content_sinks else None
        t0 = time.time()
        res = perplexity(model, ids, args.ctx, desc=name[:30], kv=kv, sink_map=sink_map)
        res.update(name=name, window=kv.window if kv else 0, seconds=round(time.time() - t0, 1),
                   config=dataclasses.asdict(kv) if kv else None)
        record(args, store, key, res)
        print(f"{name}: ppl {res['ppl']:.3f} bits {res['kv_avg_bits']:.3f} ({res['seconds']} s)", flush=True)


def content_sink_map(args: argparse.Namespace, model, tok, kv):
    """The first ``num_sinks`` positions plus the content-sink ids calibrated on ``--calib``."""
    from quantsink.calibration import calibrate
    from quantsink.calibration.sinkmap import SinkMap

    found = calibrate(model, tok, args.calib).sink_map
    print(f"calibrated content sinks: {found.content_token_ids}", flush=True)
    return SinkMap(positional=list(range(kv.num_sinks)), content_token_ids=found.content_token_ids)


@torch.no_grad()
def stream_nll(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Per-token NLL of ``ids`` fed ``chunk`` tokens at a time through ``cache`` (1: decode steps)."""
    nll, prev = [], None
    for a in tqdm(range(0, ids.numel(), chunk), desc="stream", leave=False):
        x = ids[a:a + chunk][None]
        logits = model(x, **cache_kwargs(model, cache), use_cache=True).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        if prev is not None:
            nll.append(-prev[x[0, 0]].view(1))
        nll.append(-lp[:-1].gather(1, x[0, 1:, None])[:, 0])
        prev = lp[-1]
    return torch.cat(nll)


@torch.no_grad()
def reference_nll(model, ids: torch.Tensor, ctx: int) -> torch.Tensor:
    """Per-token NLL of the unquantized model in non-overlapping ``ctx`` windows (difficulty control)."""
    out = []
    for a in range(0, ids.numel(), ctx):
        x = ids[a:a + ctx][None]
        lp = torch.log_softmax(model(x, use_cache=False).logits[0].float(), -1)
        out.append(-lp[:-1].gather(1, x[0, 1:, None])[:, 0])
    return torch.cat(out)


def run_streaming(args: argparse.Namespace, store: dict, model, tok) -> None:
    start = args.stream_offset
    ids = eval_tokens(tok, args.data, start + args.stream_tokens)[start:]
    at = f"@{start}" if start else ""  # streams that do not start at token 0 are stored apart
    n, key = args.stream_window, f"stream/{args.stream_tokens}{at}/{args.stream_cache}/reference"
    if key not in store or args.redo:
        first, last = reference_nll(model, ids[:n], args.stream_cache), reference_nll(model, ids[-n:], args.stream_cache)
        record(args, store, key, {
            "name": f"control: unquantized, non-overlapping {args.stream_cache}-token windows",
            "first_ppl": math.exp(first.mean().item()), "last_ppl": math.exp(last.mean().item()),
            "tokens": ids.numel(), "cache": args.stream_cache, "recipe": "none", "offset": start})
    base = resolve_kv_config(args.stream_recipe)
    sinks = base.num_sinks or 4
    settings = (("sinks kept", dict(num_sinks=sinks)), ("sinks evicted", dict(num_sinks=0)),
                ("control: sinks kept, 8-bit KV", dict(num_sinks=sinks, key_bits=8, value_bits=8)))
    for label, change in settings:
        key = f"stream/{args.stream_tokens}{at}/{args.stream_cache}/{label}"
        if (key in store and not args.redo) or not any(o in label for o in args.only):
            continue
        kv = dataclasses.replace(base, max_cache_tokens=args.stream_cache, **change)
        t0 = time.time()
        cache = SinkQuantCache.from_recipe(model, kv, backend="torch")
        nll = stream_nll(model, ids, cache, args.stream_chunk)
        n = args.stream_window
        record(args, store, key, {"name": label, "first_ppl": math.exp(nll[:n].mean().item()),
                                  "last_ppl": math.exp(nll[-n:].mean().item()), "tokens": ids.numel(),
                                  "cache": args.stream_cache, "recipe": args.stream_recipe, "offset": start,
                                  "seconds": round(time.time() - t0, 1)})
        print(key, store[key], flush=True)


def run_hf(args: argparse.Namespace, store: dict, model, tok) -> None:
    """Hugging Face QuantizedCache (optimum-quanto) token by token on the first ``--hf-tokens``."""
    from transformers.cache_utils import QuantizedCache

    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        print("optimum-quanto is not installed: pip install --no-deps optimum-quanto", flush=True)
        return
    ids = eval_tokens(tok, args.data, args.hf_tokens)
    for bits in args.hf_bits:
        name = f"HF QuantizedCache quanto int{bits} (per token, g64, 128 fp16 residual)"
        key = f"kv/{args.hf_tokens}/{name}"
        if (key in store and not args.redo) or not any(o in name for o in args.only):
            continue
        t0, nll = time.time(), []
        for i in tqdm(range(ids.numel() // args.ctx), desc=f"quanto int{bits}", leave=False):
            cache = QuantizedCache(backend="quanto", config=model.config, nbits=bits, q_group_size=64,
                                   residual_length=128)
            nll.append(stream_nll(model, ids[i * args.ctx:(i + 1) * args.ctx], cache, chunk=1))
        ppl = math.exp(torch.cat(nll).mean().item())
        record(args, store, key, {"name": name, "ppl": ppl, "tokens": len(nll) * args.ctx, "window": 128,
                                  "kv_avg_bits": float("nan"), "seconds": round(time.time() - t0, 1)})
        print(f"{name}: ppl {ppl:.3f} ({store[key]['seconds']} s)", flush=True)


PROMPTS = (
    "The history of the Roman Empire",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Q: What is the capital of France?\nA:",
    "Once upon a time, in a small village by the sea, there lived",
    "To make a good cup of coffee, you should first",
)


@torch.no_grad()
def gen_prompts(tok, path: Path, context: int) -> list[str]:
    """PROMPTS, each after its own ``context``-token passage of ``path`` (different articles),
    so that the quantized body, not the fp16 window, holds most of what the model reads."""
    ids = eval_tokens(tok, path, len(PROMPTS) * 4 * context)
    step = ids.numel() // len(PROMPTS)
    return [tok.decode(ids[i * step:i * step + context]) + "\n\n" + p for i, p in enumerate(PROMPTS)]


def run_generation(args: argparse.Namespace, store: dict, model, tok) -> None:
    """Greedy tokens of a left-padded batch: unquantized vs int4-sink (32) and bits=8 (64),
    with no fp16 window, after ~256-token passages of wiki.valid."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = gen_prompts(tok, Path(args.data).with_name("wiki.valid.excerpt-100KB.raw"), args.gen_context)
    batch = tok(prompts, return_tensors="pt", padding=True)
    n_new, start = 64, batch.input_ids.shape[1]

    def greedy(cache):
        out = model.generate(**batch, **cache_kwargs(model, cache), max_new_tokens=n_new, do_sample=False,
                             min_new_tokens=n_new, pad_token_id=tok.pad_token_id)
        return out[:, start:]

    from transformers import DynamicCache

    ref = greedy(DynamicCache())
    kv4 = dataclasses.replace(resolve_kv_config(args.gen_recipe), window=0)
    kv8 = dataclasses.replace(kv4, key_bits=8, value_bits=8)
    name = args.gen_recipe
    for label, kv, n in ((f"{name}, no window", kv4, 32), (f"{name} bits=8, no window", kv8, 64)):
        got = greedy(SinkQuantCache.from_recipe(model, kv, backend="torch"))
        same = [bool(torch.equal(got[i, :n], ref[i, :n])) for i in range(len(PROMPTS))]
        record(args, store, f"gen/{label}", {"name": label, "tokens": n, "matches": sum(same),
                                             "prompts": len(PROMPTS), "per_prompt": same})
        print(label, store[f"gen/{label}"], flush=True)


def run_weights(args: argparse.Namespace, store: dict) -> None:
    """Weight rows: ``scripts/bench_weights.py`` (all rows in one run, same windows); its table
    is kept in ``docs/results/weights-<tokens>.md`` and rendered into RESULTS.md."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_weights.py"), "--model", args.model,
           "--eval", str(args.data), "--tokens", str(args.max_tokens), "--ctx", str(args.ctx), "--quiet"]
    table = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    (args.store.parent / f"weights-{args.max_tokens}.md").write_text(table)
    save(args, store)


def record(args: argparse.Namespace, store: dict, key: str, row: dict) -> None:
    """Store one measured row and save it."""
    store[key] = row
    args.measured.add(key)
    save(args, store)


def save(args: argparse.Namespace, store: dict) -> None:
    """Write the rows this run measured into the file (other runs may have added or re-measured
    rows meanwhile, so everything else is taken from the file) and re-render."""
    args.store.parent.mkdir(parents=True, exist_ok=True)
    on_disk = json.loads(args.store.read_text()) if args.store.exists() else {}
    on_disk.update({k: store[k] for k in args.measured})
    store.clear()
    store.update(on_disk)
    args.store.write_text(json.dumps(store, indent=1, sort_keys=True) + "\n")
    args.out.write_text(render(store))


def render(store: dict) -> str:
    """docs/RESULTS.md from every stored row."""
    lines = ["# Results", "", "Generated by `scripts/bench_quality.py` (SmolLM2-135M, WikiText-2 test, "
             "ctx 2048, non-overlapping windows, KV-faithful evaluation: quantized body, fp16 sinks and "
             "window on the same flush schedule as generation). `kv_avg_bits` counts everything held per "
             "K/V element at the end of each window (codes, scales, zeros, fp16 outliers, fp16 sinks, fp16 "
             "window and any unfinished key group, which stays in fp16 until it is complete).", ""]
    for tokens in sorted({k.split("/")[1] for k in store if k.startswith(("kv/", "weights/"))}):
        rows = {k: v for k, v in store.items() if k.split("/")[1] == tokens and not k.startswith("stream")}
        fp = next((v["ppl"] for v in rows.values() if v["name"].startswith("fp32")), None)
        lines += [f"## Perplexity, first {tokens} tokens", "", "| row | ppl | Δ% vs fp32 | kv_avg_bits |",
                  "|---|---|---|---|"]
        for v in rows.values():
            delta = f"{100 * (v['ppl'] / fp - 1):+.2f}" if fp else "n/a"
            bits = v.get("kv_avg_bits", float("nan"))
            bits = "n/a" if math.isnan(bits) else f"{bits:.3f}"
            lines.append(f"| {v['name']} | {v['ppl']:.3f} | {delta} | {bits} |")
        lines.append("")
    streams = {k: v for k, v in store.items() if k.startswith("stream/")}
    if streams:
        lines += ["## StreamingLLM", "", "| setting | recipe | cache | stream tokens | ppl first 4k | ppl last 4k | last/first |",
                  "|---|---|---|---|---|---|---|"]
        for v in sorted(streams.values(), key=lambda v: v.get("offset", 0)):
            span = f"{v.get('offset', 0)}–{v.get('offset', 0) + v['tokens']}"
            lines.append(f"| {v['name']} | {v['recipe']} | {v['cache']} | {span} | {v['first_ppl']:.3f} "
                         f"| {v['last_ppl']:.3f} | {v['last_ppl'] / v['first_ppl']:.3f} |")
        lines.append("")
    gens = {k: v for k, v in store.items() if k.startswith("gen/")}
    if gens:
        lines += ["## Greedy generation vs the unquantized model (5 prompts after ~256-token passages, "
                  "left-padded batch, no fp16 window)", "",
                  "| KV cache | compared tokens | prompts identical |", "|---|---|---|"]
        lines += [f"| {v['name']} | {v['tokens']} | {v['matches']} / {v['prompts']} |" for v in gens.values()]
        lines.append("")
    for table in sorted((ROOT / "docs" / "results").glob("weights-*.md")):
        lines += ["## Weight quantization (`scripts/bench_weights.py`)", "", table.read_text().strip(), ""]
    notes = ROOT / "docs" / "RESULTS-notes.md"
    if notes.exists():
        lines += [notes.read_text()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=("kv", "streaming", "generation", "weights", "hf", "all"), default="all")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--stream-tokens", type=int, default=20000)
    p.add_argument("--stream-cache", type=int, default=1024)
    p.add_argument("--stream-offset", type=int, default=0, help="first token of the stream in --data")
    p.add_argument("--stream-chunk", type=int, default=64)
    p.add_argument("--stream-window", type=int, default=4096)
    p.add_argument("--stream-recipe", default="kv-int4-sink")
    p.add_argument("--hf-tokens", type=int, default=8192, help="tokens for the HF QuantizedCache rows")
    p.add_argument("--hf-bits", type=int, nargs="+", default=[4, 2])
    p.add_argument("--gen-recipe", default="kv-int4-sink")
    p.add_argument("--gen-context", type=int, default=256, help="passage tokens before each prompt")
    p.add_argument("--redo", action="store_true", help="re-measure rows already stored")
    p.add_argument("--only", nargs="+", default=[""],
                   help="KV and streaming rows whose name contains one of these")
    p.add_argument("--calib", default=str(DATA.parent / "wiki.train.excerpt-1MB.raw"),
                   help="calibration text for the content-sink rows")
    p.add_argument("--store", type=Path, default=ROOT / "docs" / "results" / "quality.json")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = p.parse_args()
    store = json.loads(args.store.read_text()) if args.store.exists() else {}
    args.measured = set()
    model, tok = load_model(args.model)
    if args.section in ("kv", "all"):
        run_kv(args, store, model, tok)
    if args.section in ("streaming", "all"):
        run_streaming(args, store, model, tok)
    if args.section in ("generation", "all"):
        run_generation(args, store, model, tok)
    if args.section in ("hf", "all"):
        run_hf(args, store, model, tok)
    if args.section in ("weights", "all"):
        run_weights(args, store)
    save(args, store)


if __name__ == "__main__":
    main()
