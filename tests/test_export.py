"""Quantize the real model, export, reload in a fresh process, compare logits; determinism."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantsink
from quantsink.errors import QuantsinkError
from quantsink.weights.backend import use_backend
from quantsink.weights.export import export
from quantsink.weights.linear import QuantLinear

pytestmark = pytest.mark.model

RECIPE = {"name": "test-w4", "weights": {"algorithm": "rtn", "group_size": 64, "outlier_channels": 8},
          "kv_cache": {"num_sinks": 1, "window": 64}}


def _quantized(smollm, windows: torch.Tensor):
    model, tok = smollm
    model = copy.deepcopy(model)
    quantsink.quantize(model, RECIPE, calib=windows, tokenizer=tok, progress=False)
    return model, tok


@pytest.fixture(scope="module")
def windows(smollm, calib_path) -> torch.Tensor:
    from quantsink.data import calibration_windows

    return calibration_windows(smollm[1], calib_path, samples=2, seq_len=128, seed=0)


@pytest.fixture(scope="module")
def exported(smollm, windows, tmp_path_factory):
    model, tok = _quantized(smollm, windows)
    out = export(model, tok, tmp_path_factory.mktemp("ckpt") / "out")
    return model, tok, out


RELOAD = r"""
import sys, torch
import quantsink  # installs the hook that registers quant_method "quantsink"
assert "transformers" not in sys.modules
from transformers import AutoModelForCausalLM
from quantsink.weights.backend import use_backend
from quantsink.weights.linear import QuantLinear
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
down = model.model.layers[3].mlp.down_proj
assert isinstance(down, QuantLinear) and down.kernel is not None, down.kernel  # chosen at load
print("kernel", down.kernel)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
    with use_backend("reference"):
        ref = model(ids).logits
torch.save((logits, ref), sys.argv[3])
gen = model.generate(ids[:, :8], max_new_tokens=32, min_new_tokens=32, do_sample=False)
print("generated", gen.shape[1] - 8)
"""


def test_reload_in_fresh_process_matches_logits_and_generates(exported, tmp_path: Path) -> None:
    model, _, out = exported
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generated 32" in proc.stdout
    logits, ref_logits = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        with use_backend("reference"):  # float32, tile by tile: reproduced exactly
            ref = model(ids).logits
        fast = model(ids).logits  # the kernel picked for this host (bf16 int4pack on AVX512)
    assert torch.equal(ref_logits, ref)
    assert torch.equal(logits, fast)  # same kernel, same inputs
    assert (fast - ref).abs().max() <= 0.03 * ref.abs().max()  # bf16 kernels (measured 1.1 %)


def test_checkpoint_layout_and_config(exported) -> None:
    _, _, out = exported
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    base = "model.layers.0.self_attn.q_proj."
    for t in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
              "outlier_idx", "outlier_weight"):
        assert base + t in names
    assert base + "weight" not in names and "lm_head.weight" not in names  # tied: stored once
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "quantsink" and qc["version"] == 1
    assert qc["weights"]["group_size"] == 64 and qc["kv_cache"]["num_sinks"] == 1
    assert "sink_map" in qc and len(qc["modules"]) == 30 * 7
    assert (out / "tokenizer.json").is_file() and (out / "quantsink_report.json").is_file()


def test_packed_linear_bytes_below_budget(exported) -> None:
    model, _, _ = exported
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    packed = sum(m.packed_nbytes() for m in layers)
    fp16 = sum(2 * m.in_features * m.out_features for m in layers)
    assert packed < 0.30 * fp16, packed / fp16


def test_same_seed_gives_byte_identical_shards(smollm, windows, exported, tmp_path: Path) -> None:
    _, _, first = exported
    model, tok = _quantized(smollm, windows)
    second = export(model, tok, tmp_path / "again")
    shards = sorted(p.name for p in first.glob("model-*.safetensors"))
    assert shards and shards == sorted(p.name for p in second.glob("model-*.safetensors"))
    for name in shards:
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_export_failure_halfway_leaves_nothing(exported, tmp_path: Path, monkeypatch) -> None:
    model, tok, _ = exported
    import quantsink.weights.export as ex

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex, "_write_config", broken)  # after the shards are written
    with pytest.raises(QuantsinkError, match="nothing was written"):
        export(model, tok, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_existing_targets(exported, tmp_path: Path) -> None:
    model, tok, _ = exported
    (tmp_path / "file").write_text("x")
    with pytest.raises(QuantsinkError, match="existing file"):
        export(model, tok, tmp_path / "file")
    (tmp_path / "dir").mkdir()
    with pytest.raises(QuantsinkError, match="already exists"):
        export(model, tok, tmp_path / "dir")
