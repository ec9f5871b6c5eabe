"""The shipped recipes, unmodified, on every architecture of the tiny matrix.

``int4-sink`` (GPTQ g64 + 16 fp16 outlier channels + int8 embedding rows + int4 KV with sinks,
window and Hadamard rotation), ``kv-int4-sink`` and ``kv-int2-sink`` each quantize, export,
reload in a fresh process and generate with the checkpoint's default sink cache. Gemma 2/3
(scaled embeddings) take the int8 rows; a Phi-3 with head_dim 96 takes the rotation
(block-diagonal Hadamard, three blocks of 32).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import tiny_models as tm
import quantsink
from quantsink.weights.export import export

RECIPES = ("int4-sink", "kv-int4-sink", "kv-int2-sink")
ARCHS = tm.ARCHS + ("qwen3_moe", "mixtral", "phi3_96")
NEW = 5


def _build(name: str):
    if name == "phi3_96":  # Phi-3's real head_dim (96) at a tiny width: 2 heads of 96
        return tm.build("phi3", hidden_size=192, num_attention_heads=2, num_key_value_heads=1, head_dim=96)
    return tm.build(name, **({"num_experts_per_tok": 4} if name == "gpt_oss" else {}))


RELOAD = r"""
import json, sys, torch
import quantsink
from transformers import AutoModelForCausalLM
root, ids = sys.argv[1], torch.load(sys.argv[1] + "/ids.pt")
out = {}
for name in sys.argv[2:]:
    impl = {"attn_implementation": "eager"} if name.startswith("gemma2") else {}
    model = AutoModelForCausalLM.from_pretrained(f"{root}/{name}", **impl).eval()
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, max_new_tokens=%d, min_new_tokens=%d, do_sample=False, pad_token_id=0)
    torch.save(logits, f"{root}/{name}.logits.pt")
    out[name] = {"tokens": gen[0, ids.shape[1]:].tolist(), "embedding": type(model.get_input_embeddings()).__name__}
print(json.dumps(out))
""" % (NEW, NEW)


@pytest.fixture(scope="module", params=RECIPES)
def matrix(request, tmp_path_factory, one_thread) -> dict:
    """Per architecture: the in-memory quantized model's logits and greedy tokens, and the same
    from a fresh-process reload of its export."""
    recipe, root = request.param, tmp_path_factory.mktemp(request.param)
    ids = tm.token_ids(40, 1, seed=9)
    torch.save(ids, root / "ids.pt")
    got = {}
    for name in ARCHS:
        model = quantsink.quantize(_build(name), recipe, calib=tm.token_ids(96, 2, seed=3), progress=False)
        with torch.no_grad():
            logits = model(ids).logits
            gen = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        export(model, None, root / name)
        got[name] = {"logits": logits, "tokens": gen[0, ids.shape[1]:].tolist(), "model": model}
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(root), *ARCHS], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ARCHS:
        got[name]["reloaded"] = reloaded[name]
        got[name]["reloaded_logits"] = torch.load(root / f"{name}.logits.pt")
    return {"recipe": recipe, "archs": got, "root": root}


@pytest.mark.parametrize("name", ARCHS)
def test_quantize_export_reload_generate(matrix, name):
    entry, recipe = matrix["archs"][name], matrix["recipe"]
    assert (entry["reloaded_logits"] - entry["logits"]).abs().max().item() <= 1e-4, name
    assert entry["reloaded"]["tokens"] == entry["tokens"], name  # the same default sink cache after reload
    qc = json.loads((matrix["root"] / name / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache"]["rotate"] is True and qc["kv_cache"]["key_bits"] == (2 if "int2" in recipe else 4)
    if recipe == "int4-sink":  # the int8 rows apply to every family, Gemma's scaled embeddings included
        assert entry["reloaded"]["embedding"] == "Int8Embedding"
