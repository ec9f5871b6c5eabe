"""Peak memory of a streamed quantization (``quantize --stream``) of a model bigger than it.

Creates a random-init Llama-shaped checkpoint on disk, layer by layer straight into
safetensors shards (the creator never holds more than one layer), then quantizes it with
:func:`quantsink.weights.streaming.quantize_streaming` in a child process and reports the
child's peak RSS against the checkpoint's weight bytes::

    OMP_NUM_THREADS=1 python scripts/bench_streaming.py --dir /tmp/big --recipe w4-g64

Defaults: hidden 2048, intermediate 5632, 32 layers, 16 heads, vocab 32000: 1.78 B parameters,
7.1 GB of fp32 weights. Calibration: ``--samples`` random windows of ``--seq-len`` token ids.
``--clean`` removes the model and the output afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from quantsink.weights.resume import STOP_ENV, work_dir_for

CHILD = """
import json, sys, time, torch
from quantsink.weights.streaming import quantize_streaming
a = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
windows = torch.randint(4, a["vocab"], (a["samples"], a["seq_len"]), generator=g)
t0 = time.perf_counter()
out, report = quantize_streaming(a["model"], a["recipe"], a["out"], calib=windows, progress=True,
                                 resume=a["resume"], force=not a["resume"])
print(json.dumps({"seconds": round(time.perf_counter() - t0, 1),
                  "checkpoint_bytes": sum(f.stat().st_size for f in out.iterdir())}))
"""


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{chr(c): c - 28 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def create(path: Path, args: argparse.Namespace) -> int:
    """Write the random checkpoint (one shard per decoder layer); returns its weight bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from quantsink.hf.lazy import build_skeleton

    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                num_hidden_layers=args.layers, num_attention_heads=args.heads,
                num_key_value_heads=args.heads, max_position_embeddings=4096,
                tie_word_embeddings=False).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    shapes = {n: t.shape for n, t in build_skeleton(path).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        key = f"layer{int(parts[2]):03d}" if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    gen, weight_map, total = torch.Generator().manual_seed(0), {}, 0
    for j, (key, names) in enumerate(sorted(groups.items()), 1):
        fname = f"model-{j:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.ones(shapes[n]) if len(shapes[n]) == 1
                       else torch.randn(shapes[n], generator=gen) * 0.02) for n in names}
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({n: fname for n in names})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--recipe", default="w4-g64")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5632)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: DIR/out)")
    p.add_argument("--resume", action="store_true", help="continue a killed run's work directory")
    p.add_argument("--stop-after", type=int, default=None,
                   help="test hook: the child SIGKILLs itself after this layer (then rerun with --resume)")
    p.add_argument("--clean", action="store_true")
    args = p.parse_args()
    model, out = args.dir / "model", args.out or args.dir / "out"
    if not (model / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        create(model, args)
        print(f"created {model} in {time.perf_counter() - t0:.0f} s", flush=True)
    weight_bytes = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    spec = {"model": str(model), "recipe": args.recipe, "out": str(out), "vocab": args.vocab,
            "samples": args.samples, "seq_len": args.seq_len, "resume": args.resume}
    env = dict(os.environ)
    if args.stop_after is not None:
        env[STOP_ENV] = str(args.stop_after)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                          text=True, env=env)
    if proc.returncode != 0:
        print(json.dumps({"returncode": proc.returncode, "work_dir_layers": len(list(
            work_dir_for(out).glob("layer-*.safetensors")))}))
        return
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({"weight_bytes": weight_bytes, "peak_rss_bytes": peak,
                      "peak_over_weights": round(peak / weight_bytes, 3), "recipe": args.recipe,
                      "calibration": [args.samples, args.seq_len], **child}))
    if args.clean:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
