"""Weight quantization on the tiny architecture matrix: every layer's own inputs, MoE experts,
export and reload with identical logits, the floating-point share, the refused layouts."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantsink
from quantsink.cli import main
from quantsink.errors import QuantsinkError
from quantsink.hf.arch import decoder_layers
from quantsink.hf.capture import capture_layer_calls, same_call
from quantsink.hf.moe import experts_layout, find_experts
from quantsink.weights.api import round_float_tensors_to_fp16
from quantsink.weights.backend import use_backend
from quantsink.weights.experts import QuantExperts
from quantsink.config import load_recipe
from quantsink.weights.export import export
from quantsink.weights.sequential import quantize_layers
from quantsink.weights.summary import build_report

import tiny_models as tm

ALL = tm.ARCHS + tm.MOE_EXTRA
HYBRID = {"gemma2": 1, "gemma3": 5, "gpt_oss": 1}  # a global layer after sliding ones
RECIPE = {"name": "w4-g32", "weights": {"algorithm": "gptq", "group_size": 32, "outlier_channels": 2,
                                        "expert_min_tokens": 16}}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _calls(model: torch.nn.Module, run) -> list[list]:
    """``run()`` with a pre-hook on every decoder layer; the ``(args, kwargs)`` of each call."""
    _, layers = decoder_layers(model)
    seen: list[list] = [[] for _ in layers]
    hooks = [layer.register_forward_pre_hook(
        lambda _m, a, k, i=i: seen[i].append((a, dict(k))), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("name", ALL)
def test_sequential_pass_feeds_each_layer_what_the_model_gives_it(name: str) -> None:
    model = tm.build(name)
    ids = tm.token_ids(96, 2)
    ref = _calls(model, lambda: model(ids, use_cache=False))
    fed = _calls(model, lambda: quantize_layers(model, ids, lambda *a: [], hessian=False, progress=False,
                                                 quantize_experts=lambda *a: []))
    for i, (want, got) in enumerate(zip(ref, fed)):
        assert len(want) == 1 and len(got) == 2  # the model's own call, the statistics pass
        for call in got:
            assert same_call(call, want[0]) <= 1e-5, (name, i)
    hidden0, calls = capture_layer_calls(model, ids)
    assert same_call(hidden0, ref[0][0][0][0]) == 0.0
    assert all(same_call((c.args, c.kwargs), (r[0][0][1:], r[0][1])) == 0.0 for c, r in zip(calls, ref))
    if name in HYBRID:  # replaying layer 0's arguments would feed the global layer the wrong mask
        assert same_call(ref[0][0][1], ref[HYBRID[name]][0][1]) > 1e-3


@pytest.mark.parametrize("name", ["gemma3", "gpt_oss"])
def test_statistics_see_the_hidden_states_of_the_quantized_layers(name: str) -> None:
    model = tm.build(name)
    round_float_tensors_to_fp16(model)  # what quantize() does at the end: a no-op afterwards
    ids = tm.token_ids(96, 2)
    before = _calls(model, lambda: model(ids, use_cache=False))
    during = _calls(model, lambda: quantsink.quantize(model, RECIPE, calib=ids, progress=False))
    with use_backend("reference"):  # the quantized model, as the statistics pass ran it
        after = _calls(model, lambda: model(ids, use_cache=False))
    for i in range(1, len(after)):
        assert same_call(during[i][-1], after[i][0]) <= 1e-5, i  # the statistics pass
        assert same_call(during[i][-1][0], before[i][0][0]) > 1e-3  # not the float model's


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Every architecture quantized (GPTQ int4 g32, 2 outlier channels) and exported, the logits
    of the in-memory model and of a fresh-process reload."""
    root = tmp_path_factory.mktemp("arch")
    ids = tm.token_ids(48, 1, seed=9)
    torch.save(ids, root / "ids.pt")
    out = {}
    for name in ALL:
        model = tm.build(name)
        quantsink.quantize(model, RECIPE, calib=tm.token_ids(96, 4, seed=3), progress=False)
        with torch.no_grad():
            logits = model(ids).logits
        report = build_report(model, load_recipe(RECIPE))
        out[name] = {"model": model, "logits": logits, "dir": export(model, None, root / name, report=report)}
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(root), *ALL], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ALL:
        out[name]["reloaded"] = torch.load(root / f"{name}.logits.pt")
    out["_stdout"] = proc.stdout
    return out


RELOAD = r"""
import sys, torch
import quantsink
from transformers import AutoModelForCausalLM
from quantsink.weights.api import round_float_tensors_to_fp16
from quantsink.weights.experts import QuantExperts
root = sys.argv[1]
ids = torch.load(f"{root}/ids.pt")
for name in sys.argv[2:]:
    impl = {"attn_implementation": "eager"} if name == "gemma2" else {}  # as tiny_models builds it
    model = AutoModelForCausalLM.from_pretrained(f"{root}/{name}", **impl).eval()
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    dense3d = [n for n, p in model.named_parameters() if p.dim() == 3]
    with torch.no_grad():
        torch.save(model(ids).logits, f"{root}/{name}.logits.pt")
    print(name, len(experts), len(dense3d))
"""


@pytest.mark.parametrize("name", ALL)
def test_gptq_export_reload_identical_logits_and_float_share(exported: dict, name: str) -> None:
    entry = exported[name]
    assert (entry["reloaded"] - entry["logits"]).abs().max().item() <= 1e-4
    report = entry["model"].quantsink_report
    assert report["decoder_float_fraction"] <= 0.05, report["decoder_float_fraction"]
    kept = {m["reason"] for m in report["float_matrices"]}
    assert kept <= {"router"}  # nothing else is left in floating point
    n_experts, n_dense3d = map(int, next(l for l in exported["_stdout"].splitlines()
                                         if l.split()[0] == name).split()[1:])
    assert n_dense3d == 0 and n_experts == (2 if name in ("gpt_oss",) + tm.MOE_EXTRA else 0)


@pytest.mark.parametrize("name", ("gpt_oss",) + tm.MOE_EXTRA)
def test_moe_report_routed_tokens_and_checkpoint_layout(exported: dict, name: str) -> None:
    model, out = exported[name]["model"], exported[name]["dir"]
    rows = [r for r in model.quantsink_report["modules"] if r.get("routed_tokens") is not None]
    assert len(rows) == 2  # one experts module per layer
    for row in rows:
        assert sum(row["routed_tokens"]) == 4 * 96 * 2  # every token goes to top-2 experts
        assert row["rtn_fallback"] == [e for e, t in enumerate(row["routed_tokens"]) if t < 16]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    base = "model.layers.0.mlp.experts."
    assert f"{base}down_proj.weight_packed" in index and f"{base}down_proj" not in index
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.experts" in qc["modules"]
    report = json.loads((out / "quantsink_report.json").read_text())
    assert report["experts"][0]["routed_tokens"] == rows[0]["routed_tokens"]


def test_moe_export_is_byte_identical_across_runs(exported: dict, tmp_path: Path) -> None:
    model = tm.build("gpt_oss")
    quantsink.quantize(model, RECIPE, calib=tm.token_ids(96, 4, seed=3), progress=False)
    again = export(model, None, tmp_path / "again")
    first = exported["gpt_oss"]["dir"]
    shards = sorted(p.name for p in first.glob("model-*.safetensors"))
    assert shards == sorted(p.name for p in again.glob("model-*.safetensors"))
    assert all((first / n).read_bytes() == (again / n).read_bytes() for n in shards)


def test_rtn_fallback_for_starved_experts_is_reported() -> None:
    model = tm.build("gpt_oss")
    recipe = {**RECIPE, "weights": {**RECIPE["weights"], "expert_min_tokens": 10**6}}
    quantsink.quantize(model, recipe, calib=tm.token_ids(32, 1), progress=False)
    rows = [r for r in model.quantsink_report["modules"] if r.get("routed_tokens") is not None]
    assert [r["rtn_fallback"] for r in rows] == [[0, 1, 2, 3]] * 2


def test_expert_whose_gptq_fails_falls_back_to_rtn_and_is_reported(monkeypatch) -> None:
    import quantsink.weights.experts_quant as eq

    calls = []

    def flaky(w, group, cfg, forced):
        calls.append(cfg.algorithm)
        if cfg.algorithm == "gptq" and len(calls) == 1:  # the first expert of the first projection
            raise torch.linalg.LinAlgError("linalg.cholesky: not positive-definite")
        return eq.quantize_matrix.__wrapped__(w, group, cfg, forced)

    flaky.__wrapped__ = eq.quantize_matrix
    monkeypatch.setattr(eq, "quantize_matrix", flaky)
    model = tm.build("gpt_oss")
    quantsink.quantize(model, RECIPE, calib=tm.token_ids(96, 4, seed=3), progress=False)
    rows = [r for r in model.quantsink_report["modules"] if r.get("routed_tokens") is not None]
    assert rows[0]["gptq_failed"] == [0] and 0 in rows[0]["rtn_fallback"] and calls[1] == "rtn"
    assert rows[1]["gptq_failed"] == []


@pytest.mark.parametrize("name", ("gpt_oss", "qwen3_moe"))
def test_quant_experts_forward_equals_family_forward_on_dequantized_weights(name: str) -> None:
    model = tm.build(name)
    source = copy.deepcopy(dict(find_experts(model.model.layers[0]))["mlp.experts"])
    quantsink.quantize(model, RECIPE, calib=tm.token_ids(96, 2), progress=False)
    quant = model.model.layers[0].mlp.experts
    assert isinstance(quant, QuantExperts) and not [p for p in quant.parameters() if p.dim() == 3]
    layout = experts_layout(source)
    with torch.no_grad():
        for proj in layout.projections:  # the same weights, in the family's storage orientation
            w = torch.stack([getattr(quant, proj).dequantize(e) for e in range(layout.num_experts)])
            getattr(source, proj).copy_(w.transpose(1, 2) if layout.is_transposed else w)
            if layout.has_bias:
                getattr(source, f"{proj}_bias").copy_(getattr(quant, f"{proj}_bias"))
        x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
        index = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i))[:2]
                             for i in range(40)])
        weights = torch.rand(40, 2, generator=torch.Generator().manual_seed(1))
        want, got = source(x, index, weights), quant(x, index, weights)
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("name", tm.UNSUPPORTED)
@pytest.mark.parametrize("command", ["quantize", "inspect"])
def test_gpt2_and_falcon_refused_with_one_line(name: str, command: str, tmp_path: Path, capsys) -> None:
    tm.save(tm.build(name), tmp_path / "model")
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    capsys.readouterr()  # save_pretrained's progress bar
    extra = ["--recipe", "w4-g64"] if command == "quantize" else []
    rc = main([command, "--model", str(tmp_path / "model"), "--calib", str(tmp_path / "calib.txt"),
               "--calib-samples", "2", "--calib-seq-len", "64", "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert tm.REFUSED[name] in err and "supported: Llama" in err and not (tmp_path / "out").exists()


def test_falcon_refused_in_a_real_process(tmp_path: Path) -> None:
    """No transformers log line next to the error: stderr is exactly one line."""
    tm.save(tm.build(tm.REFUSED_FALCON), tmp_path / "model")
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    proc = subprocess.run([sys.executable, "-m", "quantsink", "inspect", "--model", str(tmp_path / "model"),
                           "--calib", str(tmp_path / "calib.txt"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"quantsink inspect: error: FalconForCausalLM {tm.REFUSED[tm.REFUSED_FALCON]}")


def test_unknown_matrix_is_refused_before_any_work() -> None:
    model = tm.build("gpt2")
    with pytest.raises(QuantsinkError, match=r"transformer\.h\.0\..*Conv1D.*allowed: nn\.Linear"):
        quantsink.quantize(model, RECIPE, calib=torch.zeros(1, 1, dtype=torch.long), progress=False)
