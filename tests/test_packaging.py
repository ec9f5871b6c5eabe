"""The checkout shadows no other package, from any working directory (the repo root included).

``kernels/`` and ``recipes/`` are installed as ``quantsink.kernels`` / ``quantsink.recipes``;
from the repo root (``python -m pytest``, ``python -c``) they must not answer to the
top-level names ``kernels`` (Hugging Face's package, which transformers >= 5.25 imports) or
``recipes``. Every check runs a fresh interpreter whose ``sys.path[0]`` is the repo root.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAMES = ("kernels", "recipes", "scripts", "tests", "docs")  # every top-level folder but quantsink/

PROBE = """
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        m = importlib.import_module(name)
    except ImportError as exc:
        out[name] = {"error": str(exc)}
        continue
    out[name] = {"file": getattr(m, "__file__", None), "path": list(getattr(m, "__path__", []) or []),
                 "fake": getattr(m, "FAKE", False)}
out["quantsink imported"] = "quantsink" in sys.modules
print(json.dumps(out))
"""


def _probe(env_path: str | None = None) -> dict:
    env = None
    if env_path:
        import os

        env = {**os.environ, "PYTHONPATH": env_path}  # after sys.path[0] (the repo root)
    proc = subprocess.run([sys.executable, "-c", PROBE, *NAMES], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _inside_checkout(p: str | None) -> bool:
    return p is not None and Path(p).resolve().is_relative_to(REPO)


def test_no_checkout_code_answers_to_a_top_level_name():
    """Without a package of that name installed, the import runs none of the checkout's code."""
    found = _probe()
    assert not found.pop("quantsink imported"), "importing a top-level name imported quantsink"
    for name, info in found.items():
        if "error" in info:
            continue
        if name == "kernels" and importlib.util.find_spec("kernels") is not None:
            continue  # checked against the installed package below
        assert not _inside_checkout(info["file"]), f"{name} resolves to {info['file']}"


def test_installed_packages_win_over_the_checkouts_folders(tmp_path):
    """A package installed under any of the folder names is what ``import name`` gives."""
    for name in NAMES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("FAKE = True\n")
    found = _probe(str(tmp_path))
    for name in NAMES:
        assert found[name].get("fake"), f"import {name} from the repo root gave {found[name]}"


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="Hugging Face's kernels is not installed")
def test_hf_kernels_resolves_and_a_model_loads_from_the_repo_root(tmp_path):
    """transformers' hub-kernels import and a from_pretrained load, started in the repo root."""
    script = f"""
import torch, transformers
from kernels import LayerRepository  # what transformers' hub_kernels imports
import kernels
assert 'site-packages' in kernels.__file__ or not kernels.__file__.startswith({str(REPO)!r}), kernels.__file__
cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1)
transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained({str(tmp_path)!r})
import quantsink
model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
print(model(torch.tensor([[1, 2, 3]])).logits.shape)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch.Size([1, 3, 64])" in proc.stdout


def test_the_installed_names_still_work():
    """``quantsink.kernels`` and ``quantsink.recipes`` import from the repo root as before."""
    proc = subprocess.run([sys.executable, "-c", "import quantsink, quantsink.kernels.cpu_ext as c; "
                           "print(c.__name__, len(quantsink.available_recipes()))"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "quantsink.kernels.cpu_ext" and int(proc.stdout.split()[1]) > 0
