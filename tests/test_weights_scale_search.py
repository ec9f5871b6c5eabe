"""AWQ-style scale search (weights.scale_search): folding keeps the float model, the search never
loses to no scaling on its own metric, and both checkpoint formats reload what was quantized."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import quantsink
import tiny_models as tm
from quantsink.errors import QuantsinkError
from quantsink.hf.fold import check_foldable
from quantsink.weights.backend import use_backend
from quantsink.weights.export import export
from quantsink.weights.layer import make_search_quantizer
from quantsink.weights.scale_search import candidates, channel_scales, fixed_mask, make_layer_scaler, search_scale
from quantsink.weights.config import WeightConfig
from quantsink.weights.groups import InputGroup
from quantsink.weights.sequential import quantize_layers

CT = "compressed-tensors"


def _recipe(fmt: str, algorithm: str = "gptq", **kw) -> dict:
    native = fmt == "quantsink"
    w = {"algorithm": algorithm, "group_size": 32 if native else 128, "symmetric": not native,
         "outlier_channels": 8 if native else 0, "scale_search": True, "scale_grid": 10, **kw}
    return {"name": f"tiny-awq-{fmt}", "weights": w}


def _model(arch: str = "llama"):
    return tm.build(arch, hidden_size=128, head_dim=32, intermediate_size=256)


def _quantized(fmt: str, arch: str = "llama", algorithm: str = "gptq"):
    model = _model(arch)
    quantsink.quantize(model, _recipe(fmt, algorithm), calib=tm.token_ids(64, batch=4),
                       tokenizer=tm.char_tokenizer(), progress=False, format=fmt)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # qwen2: v bias; all: GQA 4/2 heads
def test_folding_alone_keeps_the_float_logits(arch: str) -> None:
    model = _model(arch)
    ids = tm.token_ids(48, batch=2, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
    cfg = WeightConfig(group_size=32, outlier_channels=0, scale_search=True, scale_grid=10)
    scaler = make_layer_scaler(model, cfg.scale_grid, make_search_quantizer(cfg, [], 128))
    seen: list[dict] = []

    def record(layer, prefix, group) -> list[dict]:  # no quantization: the layers stay float
        seen.append(dict(group.extra.get("report", {})))
        return []
    quantize_layers(model, tm.token_ids(64, batch=4), record, progress=False, prepare_layer=scaler)
    with torch.no_grad():
        out = model(ids).logits
    assert len(seen) == 8 and any(r["scale_alpha"] > 0 for r in seen)
    assert max(r["scale_fold_rel_change"] for r in seen) < 1e-5
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert not torch.equal(model.model.layers[0].input_layernorm.weight,  # the fold did happen
                           _model(arch).model.layers[0].input_layernorm.weight)
    for layer in model.model.layers:  # folded norms are on the fp16 grid
        w = layer.post_attention_layernorm.weight
        assert torch.equal(w, w.half().float())


def test_search_never_loses_to_alpha_zero_and_finds_outlier_channels() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[:, :4] *= 30  # salient input channels
    w = torch.randn(96, 64) * 0.05
    group = InputGroup(["q"], x.abs().amax(0), x.T @ x / 512, 512, mean_abs=x.abs().mean(0))
    cfg = WeightConfig(group_size=32, outlier_channels=0, symmetric=True)
    quantize, _ = make_search_quantizer(cfg, [], 64)("p", ["q"])
    choice = search_scale(w, group, quantize, grid=20)
    assert choice.alpha > 0 and choice.error < 0.9 * choice.error_unscaled
    assert bool((choice.scale[:4] > choice.scale[4:].max()).all())
    s = channel_scales(torch.arange(1.0, 9.0), 0.5, repeat=2, block=2)  # 2 kv heads x 2 query heads x 2
    assert torch.equal(s.view(2, 2, 2)[:, 0], s.view(2, 2, 2)[:, 1])
    every = search_scale(w, group, quantize, grid=20, stats=("mean", "duo", "absmax"))
    assert every.error <= choice.error and every.stat in ("mean", "duo", "absmax")
    assert len(candidates(w, group, 20, ("mean", "duo", "absmax"))) == 19 + 20 + 19
    fixed = search_scale(w, group, quantize, grid=20, fixed=torch.tensor([0, 1]))  # fp16 outliers
    assert bool((fixed.scale[:2] == 1).all()) and fixed.error <= fixed.error_unscaled
    assert fixed_mask(8, torch.tensor([5]), repeat=2, block=2).nonzero().flatten().tolist() == [5, 7]


@pytest.mark.parametrize("fmt", ["quantsink", CT])
def test_reported_choice_is_never_worse_than_unscaled(fmt: str) -> None:
    model = _quantized(fmt)
    rows = model.quantsink_report["scale_search"]
    assert len(rows) == 8 and {r["fold"] for r in rows} == {
        "input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"}
    assert all(r["error"] <= r["error_unscaled"] and 0 <= r["alpha"] < 1 for r in rows)
    assert {r["stat"] for r in rows} <= {"mean", "none"}
    mods = {m["name"]: m for m in model.quantsink_report["modules"]}
    assert mods["model.layers.1.mlp.down_proj"]["scale_fold"] == "mlp.up_proj"


def test_compressed_tensors_export_reloads_without_quantsink(tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    from test_compressed_tensors import read_without_quantsink

    model = _quantized(CT)
    out = export(model, tm.char_tokenizer(), tmp_path / "ct", format=CT)
    meta = json.loads((out / "quantsink.json").read_text())
    assert meta["weights"]["scale_search"] is True and meta["weights"]["outlier_channels"] == 0
    ids = tm.token_ids(48, batch=2, seed=7)
    (logits,) = read_without_quantsink([(out, False)], ids, tmp_path)
    with torch.no_grad(), use_backend("reference"):  # the dequantized model (int4pack: bf16 activations)
        ref = model(ids).logits
    assert (logits - ref).abs().max().item() <= 1e-3


def test_native_export_with_scale_search_reloads(tmp_path: Path) -> None:
    model = _quantized("quantsink")
    assert all(m["outliers"] == 8 for m in model.quantsink_report["modules"])
    q = model.model.layers[0].mlp.down_proj  # its fp16 outlier channels were left unscaled
    assert q.outlier_idx.numel() == 8
    out = export(model, tm.char_tokenizer(), tmp_path / "native")
    again, _ = quantsink.load(out)
    ids = tm.token_ids(48, batch=2, seed=7)
    with torch.no_grad(), use_backend("reference"):
        assert (again(ids).logits - model(ids).logits).abs().max().item() <= 1e-3


def test_rtn_with_scale_search_needs_windows() -> None:
    with pytest.raises(QuantsinkError) as err:
        quantsink.quantize(_model(), _recipe("quantsink", "rtn"), progress=False)
    assert "scale_search=True" in str(err.value) and "--calib" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch, why", [("gemma3", "pre_feedforward_layernorm"), ("olmo2", "post_feedforward"),
                                       ("phi3", "no nn.Linear self_attn.q_proj"),
                                       ("cohere", "no post_attention_layernorm"),
                                       ("gpt_oss", "no nn.Linear mlp.gate_proj")])
def test_unfoldable_architectures_are_refused_before_any_work(arch: str, why: str) -> None:
    model = tm.build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantsinkError) as err:
        quantsink.quantize(model, _recipe(CT, group_size=64), calib=tm.token_ids(32, batch=2),
                           tokenizer=tm.char_tokenizer(), progress=False, format=CT)
    msg = str(err.value)
    assert why in msg and "allowed: Llama, Qwen2" in msg and "scale_search: false" in msg and "\n" not in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gemma_style_norm_is_refused() -> None:
    """A ``1 + weight`` norm in a Llama layout: the multiplicative probe says no."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    model = _model()
    model.model.layers[1].input_layernorm = GemmaRMSNorm(128)
    with pytest.raises(QuantsinkError, match=r"layer 1: its input_layernorm \(GemmaRMSNorm\) is not"):
        check_foldable(model)


@pytest.mark.parametrize("weights, needle", [
    ({"scale_grid": 0}, "weights.scale_grid=0 is not supported; allowed: an integer 2..1000"),
    ({"scale_grid": 1}, "allowed: an integer 2..1000"),
    ({"scale_stats": []}, "allowed: a non-empty list without repeats of ['mean', 'duo', 'absmax']"),
    ({"scale_stats": ["mean", "max"]}, "weights.scale_stats=['mean', 'max'] is not supported"),
])
def test_bad_scale_grid_is_one_line(weights: dict, needle: str) -> None:
    with pytest.raises(QuantsinkError) as err:
        quantsink.load_recipe({"name": "x", "weights": {"scale_search": True, **weights}})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_group_with_an_ignored_layer_is_left_unscaled() -> None:
    model = _model()
    recipe = _recipe(CT)
    recipe["weights"]["ignore"] = ["lm_head", "o_proj"]
    quantsink.quantize(model, recipe, calib=tm.token_ids(64, batch=4), tokenizer=tm.char_tokenizer(),
                       progress=False, format=CT)
    folds = [r["fold"] for r in model.quantsink_report["scale_search"]]
    assert len(folds) == 6 and "self_attn.v_proj" not in folds
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear
