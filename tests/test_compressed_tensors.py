"""compressed-tensors pack-quantized export, checked by readers quantsink did not write.

compressed-tensors' own compressor and decompressor, its config serialisation, and
transformers' compressed-tensors loader in a fresh process without quantsink. Tiny Llama
models: hidden 128 (every layer takes groups of 128) and hidden 192 (q/k/v/o/gate/up need
the fallback to groups of 64, down_proj keeps 128: two config groups).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantsink
import tiny_models as tm
from quantsink.errors import QuantsinkError
from quantsink.weights.backend import use_backend
from quantsink.weights.ct_export import model_grids, read_metadata, sink_cache
from quantsink.weights.export import export

CT = "compressed-tensors"


def _recipe(symmetric: bool, algorithm: str = "gptq", outliers: int = 0, kv: bool = False) -> dict:
    r = {"name": "tiny-ct", "weights": {"algorithm": algorithm, "group_size": 128,
                                        "outlier_channels": outliers, "symmetric": symmetric}}
    if kv:
        r["kv_cache"] = {"num_sinks": 1, "window": 16, "key_group_size": 16, "value_group_size": 16}
    return r


def _tiny(hidden: int, symmetric: bool, fallback: bool = False, algorithm: str = "rtn", **kw):
    model = tm.build("llama", hidden_size=hidden, head_dim=hidden // 4, intermediate_size=256)
    calib = tm.token_ids(64, batch=4) if algorithm == "gptq" else None
    quantsink.quantize(model, _recipe(symmetric, algorithm, **kw), calib=calib,
                       tokenizer=tm.char_tokenizer(), progress=False, format=CT,
                       group_fallback=fallback)
    return model


@pytest.fixture(scope="module")
def uniform(tmp_path_factory):
    """Hidden 128, symmetric, GPTQ, groups of 128 everywhere, a KV section; exported."""
    model = _tiny(128, symmetric=True, algorithm="gptq", kv=True)
    return model, export(model, tm.char_tokenizer(), tmp_path_factory.mktemp("u") / "ct", format=CT)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Hidden 192, symmetric, RTN, groups of 128 (down_proj) and 64 (the rest); exported."""
    model = _tiny(192, symmetric=True, fallback=True)
    return model, export(model, tm.char_tokenizer(), tmp_path_factory.mktemp("m") / "ct", format=CT)


@pytest.fixture(scope="module")
def uniform_asym(tmp_path_factory):
    """Hidden 128, asymmetric (packed zero points), groups of 128; exported."""
    model = _tiny(128, symmetric=False)
    return model, export(model, tm.char_tokenizer(), tmp_path_factory.mktemp("ua") / "ct", format=CT)


@pytest.fixture(scope="module")
def mixed_asym(tmp_path_factory):
    """Hidden 192, asymmetric, groups of 128 and 64; exported."""
    model = _tiny(192, symmetric=False, fallback=True)
    return model, export(model, tm.char_tokenizer(), tmp_path_factory.mktemp("ma") / "ct", format=CT)


ALL = ["uniform", "mixed", "uniform_asym", "mixed_asym"]


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _qconfig(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("which", ALL)
def test_tensor_layout(which, request) -> None:
    model, out = request.getfixturevalue(which)
    sizes = {64, 128} if which.startswith("mixed") else {128}
    t = _tensors(out)
    assert sizes == {g.group_size for g in model_grids(model).values()}
    for name, grid in model_grids(model).items():
        o, n = grid.codes.shape
        assert f"{name}.weight" not in t and f"{name}.outlier_idx" not in t
        assert t[f"{name}.weight_packed"].dtype == torch.int32
        assert t[f"{name}.weight_packed"].shape == (o, n // 8)
        assert t[f"{name}.weight_scale"].shape == (o, n // grid.group_size)
        assert t[f"{name}.weight_shape"].dtype == torch.int64
        assert t[f"{name}.weight_shape"].tolist() == [o, n]
        if grid.symmetric:
            assert f"{name}.weight_zero_point" not in t
        else:
            zp = t[f"{name}.weight_zero_point"]
            assert zp.dtype == torch.int32 and zp.shape == (o // 8, n // grid.group_size)
    assert t["lm_head.weight"].dtype == torch.float16  # untied, ignored, stored as is


def test_config_groups_targets_and_ignore(uniform, mixed_asym) -> None:
    qc = _qconfig(uniform[1])
    assert list(qc["config_groups"]) == ["group_0"]
    g0 = qc["config_groups"]["group_0"]
    assert g0["targets"] == ["Linear"] and g0["format"] == "pack-quantized"
    assert g0["weights"] == {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128,
                             "strategy": "group", "dynamic": False}
    assert qc["ignore"] == ["lm_head"] and qc["quantization_status"] == "compressed"
    assert qc["kv_cache_scheme"] is None and qc["format"] == "pack-quantized"
    qc = _qconfig(mixed_asym[1])
    groups = qc["config_groups"]
    assert [g["weights"]["group_size"] for g in groups.values()] == [128, 64]
    assert groups["group_0"]["targets"] == [r"re:(.*\.)?model\.layers\.\d+\.mlp\.down_proj$"]
    assert len(groups["group_1"]["targets"]) == 6 and not groups["group_1"]["weights"]["symmetric"]
    assert json.loads((mixed_asym[1] / "config.json").read_text())["dtype"] == "float32"


def _ct_scheme(qc: dict, name: str):
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name

    config = QuantizationConfig.model_validate(qc)
    schemes = [s for s in config.config_groups.values()
               if any(t == "Linear" or match_name(name, t) for t in s.targets)]
    assert len(schemes) == 1, name
    return schemes[0]


@pytest.mark.parametrize("which", ALL)
def test_compressed_tensors_compressor_round_trips_every_tensor(which, request) -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor as P

    model, out = request.getfixturevalue(which)
    stored, qc = _tensors(out), _qconfig(out)
    for name, grid in model_grids(model).items():
        scheme = _ct_scheme(qc, name)
        ours = {k.removeprefix(name + "."): v for k, v in stored.items() if k.startswith(name + ".")}
        dense = grid.dequantize()  # [out, in] fp32, what quantsink computes with
        back = P.decompress({**ours, "weight_scale": ours["weight_scale"].float()}, scheme)
        assert torch.equal(back["weight"], dense), name
        sd = {"weight": dense, "weight_scale": grid.scale.float()}
        if not grid.symmetric:  # compressed-tensors zero points are signed int8
            sd["weight_zero_point"] = (grid.zero.to(torch.int16) - 8).to(torch.int8)
        theirs = P.compress(sd, scheme)
        assert set(theirs) == set(ours) - {"bias"}, name
        for key in ("weight_packed", "weight_shape", "weight_zero_point"):
            if key in ours:
                assert torch.equal(theirs[key], ours[key]), (name, key)


@pytest.mark.parametrize("which", ALL)
def test_config_is_what_compressed_tensors_writes(which, request, tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    ours = _qconfig(request.getfixturevalue(which)[1])
    (tmp_path / "config.json").write_text("{}")
    ModelCompressor(quantization_config=QuantizationConfig.model_validate(ours)).update_config(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == ours


READER = r"""
import sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
ids = torch.load(sys.argv[1])
for out, dequantize in zip(sys.argv[2::2], sys.argv[3::2]):
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize == "1" else {}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw).eval()
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.save(model(ids).logits, out + ".logits.pt")
assert "quantsink" not in sys.modules, "quantsink was imported"
"""


def read_without_quantsink(dirs: list[tuple[Path, bool]], ids: torch.Tensor,
                           tmp: Path) -> list[torch.Tensor]:
    """Logits of ``ids`` from transformers' compressed-tensors loader in one fresh process
    that never imports quantsink; ``dirs``: ``(checkpoint, load with dequantize=True)``."""
    torch.save(ids, tmp / "ids.pt")
    args = [a for out, deq in dirs for a in (str(out), "1" if deq else "0")]
    proc = subprocess.run([sys.executable, "-c", READER, str(tmp / "ids.pt"), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{out}.logits.pt") for out, _ in dirs]


READ = ["uniform", "mixed", "uniform_asym"]


@pytest.fixture(scope="module")
def read_back(request, tmp_path_factory) -> dict:
    """Symmetric checkpoints through the default load path (per-layer schemes); asymmetric ones
    through ``dequantize=True``: transformers 5.24 with compressed-tensors 0.20.1 builds the
    unpacked zero-point shape on the meta device and refuses the packed one (llm-compressor's
    own W4A16_ASYM checkpoints too), and ``dequantize=True`` knows one dense scheme only (so no
    mixed asymmetric case)."""
    pytest.importorskip("compressed_tensors")
    ids = tm.token_ids(48, batch=2, seed=7)
    fixtures = {w: request.getfixturevalue(w) for w in READ}
    logits = read_without_quantsink([(fixtures[w][1], w.endswith("asym")) for w in READ], ids,
                                    tmp_path_factory.mktemp("read"))
    return {w: (fixtures[w][0], ids, lg) for w, lg in zip(READ, logits)}


@pytest.mark.parametrize("which", READ)
def test_transformers_loads_it_without_quantsink(which, read_back) -> None:
    model, ids, logits = read_back[which]
    with torch.no_grad(), use_backend("reference"):  # quantsink's exact dequantized model
        ref = model(ids).logits
    assert (logits - ref).abs().max().item() <= 1e-3


def test_two_runs_write_byte_identical_files(uniform, tmp_path: Path) -> None:
    model = _tiny(128, symmetric=True, algorithm="gptq", kv=True)
    again = export(model, tm.char_tokenizer(), tmp_path / "again", format=CT)
    first = uniform[1]
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


def test_metadata_carries_the_kv_recipe_and_builds_the_sink_cache(uniform) -> None:
    model, out = uniform
    meta = read_metadata(out)
    assert meta["kv_cache"]["num_sinks"] == 1 and meta["weights"]["outlier_channels"] == 0
    assert meta["layers_per_group_size"] == {"128": 14} and "sink_map" in meta
    assert type(sink_cache(model, out)).__name__ == "SinkQuantCache"


def test_outlier_recipe_refused_unless_dropped() -> None:
    model = tm.build("llama", hidden_size=128, head_dim=32, intermediate_size=256)
    with pytest.raises(QuantsinkError) as err:
        quantsink.quantize(model, _recipe(True, "rtn", outliers=8), format=CT, progress=False)
    assert "outlier_channels=8" in str(err.value) and "--drop-outliers" in str(err.value)
    assert "\n" not in str(err.value) and not getattr(model, "quantsink_report", None)
    quantsink.quantize(model, _recipe(True, "rtn", outliers=8), format=CT, drop_outliers=True,
                       progress=False)
    assert all(g.codes.shape[1] == 128 or g.codes.shape[1] == 256 for g in model_grids(model).values())


@pytest.mark.parametrize("kwargs, needle", [
    (dict(format="gguf"), "allowed: ['quantsink', 'compressed-tensors']"),
    (dict(format=CT), "first: model.layers.0.self_attn.q_proj, in_features=192"),
    (dict(format="quantsink", drop_outliers=True), "--drop-outliers"),
    (dict(format="quantsink", group_fallback=True), "--group-fallback"),
])
def test_bad_format_requests_are_one_line(kwargs: dict, needle: str) -> None:
    model = tm.build("llama", hidden_size=192, head_dim=48, intermediate_size=256)
    with pytest.raises(QuantsinkError) as err:
        quantsink.quantize(model, _recipe(True, "rtn"), progress=False, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)
    if kwargs["format"] == CT:
        assert "weights.group_size 64 or 32" in str(err.value) and "--group-fallback" in str(err.value)


def test_native_export_refuses_fallback_groups(mixed, tmp_path: Path) -> None:
    with pytest.raises(QuantsinkError, match="stores one group size"):
        export(mixed[0], None, tmp_path / "native")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_model_with_outliers_and_writes_nothing(tmp_path: Path) -> None:
    model = tm.build("llama", hidden_size=128, head_dim=32, intermediate_size=256)
    quantsink.quantize(model, _recipe(True, "rtn", outliers=8), calib=tm.token_ids(32, batch=2),
                       tokenizer=tm.char_tokenizer(), progress=False)  # native format
    with pytest.raises(QuantsinkError, match="fp16 outlier input channels"):
        export(model, None, tmp_path / "out", format=CT)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.model
def test_smollm2_round_trip_through_transformers(smollm, tmp_path: Path) -> None:
    """The real model: 576-wide layers take groups of 64, down_proj 128; tied embedding stored once."""
    pytest.importorskip("compressed_tensors")
    import copy

    model, tok = copy.deepcopy(smollm[0]), smollm[1]
    recipe = {"name": "smol-ct-rtn", "weights": {"algorithm": "rtn", "group_size": 128, "symmetric": True,
                                                 "outlier_channels": 0, "clip_search": False}}
    quantsink.quantize(model, recipe, progress=False, format=CT, group_fallback=True)
    out = export(model, tok, tmp_path / "ct", format=CT)
    qc = _qconfig(out)
    assert qc["ignore"] == ["lm_head"] and "lm_head.weight" not in _tensors(out)
    assert [g["weights"]["group_size"] for g in qc["config_groups"].values()] == [128, 64]
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    (logits,) = read_without_quantsink([(out, False)], ids, tmp_path)
    with torch.no_grad(), use_backend("reference"):  # quantsink's exact dequantized model
        ref = model(ids).logits
    assert (logits - ref).abs().max().item() <= 1e-3
