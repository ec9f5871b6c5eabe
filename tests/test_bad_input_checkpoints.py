"""Bad checkpoints, calibration artifacts and numbers: one line, exit 2, nothing written.

The companion of test_bad_input.py for what arrives through files written earlier (a quantsink
or compressed-tensors export, a calibration artifact, a model's own weights): a misspelled
``quant_method`` or a malformed ``quantization_config`` never loads random weights, an export is
never re-quantized, NaN/Inf weights and statistics are named (layer and tensor) before any work
is written, and recipe settings that do not fit the model are refused instead of clamped.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from bad_input_util import run_cli_case
from quantsink.cli import main
from quantsink.errors import QuantsinkError

W4 = "name: tiny\nweights:\n  bits: 4\n  group_size: 32\n  algorithm: rtn\n  outlier_channels: 0\n"
GPTQ = W4.replace("algorithm: rtn", "algorithm: gptq")
TEXT = "The quick brown fox jumps over the lazy dog.\n" * 60


def _copy(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint directory (weights hard-linked: only config.json is rewritten)."""
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)
    return dst


def _edit_config(root: Path, name: str, src: str, edit) -> None:
    d = _copy(root / src, root / name)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").unlink()  # a hard link: do not write through to the source
    (d / "config.json").write_text(json.dumps(cfg))


def _qc(edit):
    return lambda cfg: edit(cfg["quantization_config"])


QC_EDITS = {
    "q_misspelled": _qc(lambda q: q.update(quant_method="quantsnk")),
    "q_no_method": _qc(lambda q: q.pop("quant_method")),
    "q_unknown_key": _qc(lambda q: q.update(colour="blue")),
    "q_version2": _qc(lambda q: q.update(version=2)),
    "q_bits5": _qc(lambda q: q["weights"].update(bits=5)),
    "q_group7": _qc(lambda q: q["weights"].update(group_size=7)),
    "q_weights_key": _qc(lambda q: q["weights"].update(bitz=4)),
    "q_weights_list": _qc(lambda q: q.update(weights=[4, 32])),
    "q_weights_str": _qc(lambda q: q["weights"].update(bits="four")),
    "q_kv_bits3": _qc(lambda q: q.update(kv_cache={"key_bits": 3})),
    "q_sinkmap_key": _qc(lambda q: q.update(sink_map={"positional": [0], "where": 1})),
    "q_module_missing": _qc(lambda q: q["modules"].append("model.layers.7.mlp.up_proj")),
    "q_module_typo": _qc(lambda q: q["modules"].__setitem__(0, "model.layers.0.self_attn.qq_proj")),
    "q_modules_str": _qc(lambda q: q.update(modules="model.layers.0.mlp.up_proj")),
    "q_modules_no_weights": _qc(lambda q: q.update(weights=None)),
    "q_not_object": lambda cfg: cfg.update(quantization_config="quantsink"),
    "cfg_model_type": lambda cfg: cfg.update(model_type="llamma"),
    "cfg_no_model_type": lambda cfg: (cfg.pop("model_type"), cfg.update(architectures=["Nope"])),
    "cfg_bert": lambda cfg: cfg.update(model_type="bert", architectures=["BertModel"]),
    "cfg_t5": lambda cfg: cfg.update(model_type="t5", architectures=["T5Model"]),
}


def _artifact(root: Path) -> None:
    from quantsink.calibration import calibrate

    model = tm.build("llama")
    cal = calibrate(model, tm.char_tokenizer(), tm.token_ids(64, batch=2), progress=False)
    cal.save(root / "cal")
    variants = {"cal_nojson": "calibration.json", "cal_nostats": "stats.safetensors"}
    for name, drop in variants.items():
        shutil.copytree(root / "cal", root / name)
        (root / name / drop).unlink()
    meta = json.loads((root / "cal" / "calibration.json").read_text())
    jsons = {"cal_badjson": "{oops", "cal_v2": json.dumps({**meta, "version": 2}),
             "cal_nosinkmap": json.dumps({k: v for k, v in meta.items() if k != "sink_map"}),
             "cal_sinkmap_key": json.dumps({**meta, "sink_map": {**meta["sink_map"], "colour": 1}}),
             "cal_list": "[1, 2]"}
    for name, text in jsons.items():
        shutil.copytree(root / "cal", root / name)
        (root / name / "calibration.json").write_text(text)
    shutil.copytree(root / "cal", root / "cal_nonutf8")
    (root / "cal_nonutf8" / "calibration.json").write_bytes(b'{"version": 1, "model": "caf\xe9"}')
    shutil.copytree(root / "cal", root / "cal_garbage_stats")
    (root / "cal_garbage_stats" / "stats.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"garbage!")
    shutil.copytree(root / "cal", root / "cal_trunc_stats")
    st = root / "cal_trunc_stats" / "stats.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    cal.stats["act_absmax/model.layers.1.mlp.down_proj"][3] = float("nan")
    cal.save(root / "cal_nan")


def _numbers(root: Path) -> None:
    """Tiny models with a NaN weight, an Inf weight, and finite weights whose activations overflow."""
    for name, (module, value) in {"nan": ("mlp.down_proj", float("nan")),
                                  "inf": ("self_attn.q_proj", float("inf"))}.items():
        model = tm.build("llama")
        with torch.no_grad():
            model.model.layers[1].get_submodule(module).weight[2, 5] = value
        tm.save(model, root / name)
    model = tm.build("llama")
    with torch.no_grad():
        for m in (model.model.layers[0].mlp.gate_proj, model.model.layers[0].mlp.up_proj):
            m.weight.mul_(1e30)
    tm.save(model, root / "huge")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Exports (quantsink, compressed-tensors), edited copies, artifacts and NaN models."""
    from quantsink.weights.api import quantize
    from quantsink.weights.export import export

    root = tmp_path_factory.mktemp("badckpt")
    model = tm.save("llama", root / "tiny")
    recipe = {"name": "t", "weights": {"algorithm": "rtn", "group_size": 32, "outlier_channels": 0}}
    export(quantize(model, recipe, progress=False), tm.char_tokenizer(), root / "q")
    ct = quantize(tm.build("llama"), recipe, progress=False, format="compressed-tensors")
    export(ct, tm.char_tokenizer(), root / "ct", format="compressed-tensors")
    for name, edit in QC_EDITS.items():
        _edit_config(root, name, "tiny" if name.startswith("cfg_") else "q", edit)
    _copy(root / "tiny", root / "cfg_list")
    (root / "cfg_list" / "config.json").unlink()
    (root / "cfg_list" / "config.json").write_text("[]")
    _copy(root / "tiny", root / "cfg_nonutf8")
    (root / "cfg_nonutf8" / "config.json").unlink()
    (root / "cfg_nonutf8" / "config.json").write_bytes(b'{"model_type": "caf\xe9"}')
    _missing_tensor(root)
    _artifact(root)
    _numbers(root)
    files = {"text.txt": TEXT, "w4.yaml": W4, "gptq.yaml": GPTQ,
             "ignore.yaml": W4 + "  ignore: [lm_hed]\n", "ignore2.yaml": W4 + "  ignore: [lm_head, q_prj]\n",
             "outl40.yaml": W4.replace("outlier_channels: 0", "outlier_channels: 40"),
             "outl100.yaml": W4.replace("outlier_channels: 0", "outlier_channels: 100"),
             "seq.yaml": W4 + "calibration:\n  seq_len: 100000\n"}
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "afile").write_text("x")
    return root


def _missing_tensor(root: Path) -> None:
    """Checkpoints with one tensor left out / saved with the wrong shape."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(root / "tiny" / "model.safetensors"))
    for name, edit in {"missing_tensor": lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
                       "wrong_shape": lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3)})
                       }.items():
        d = _copy(root / "tiny", root / name)
        (d / "model.safetensors").unlink()
        edited = dict(tensors)
        edit(edited)
        save_file(edited, str(d / "model.safetensors"), metadata={"format": "pt"})


def ev(model: str, *extra: str) -> list[str]:
    return ["eval", "--model", model, "--data", "@text.txt", "--ctx", "32", "--max-tokens", "64", "--no-progress",
            *extra]


def q(model: str = "@tiny", *extra: str, recipe: str = "@w4.yaml") -> list[str]:
    return ["quantize", "--model", model, "--recipe", recipe, "--out", "@out", "--quiet", *extra]


def qcal(*extra: str, model: str = "@tiny", recipe: str = "@w4.yaml") -> list[str]:
    return q(model, "--calib", "@text.txt", "--calib-seq-len", "32", "--calib-samples", "2", *extra, recipe=recipe)


def ins(model: str = "@tiny", *extra: str) -> list[str]:
    return ["inspect", "--model", model, "--calib", "@text.txt", "--calib-seq-len", "32", "--calib-samples", "2",
            "--out", "@rep", "--no-plots", "--no-progress", *extra]


CLI_CASES = {
    # quantization_config of a checkpoint (loaded by eval / quantsink.load / from_pretrained)
    "ckpt quant_method misspelled": (ev("@q_misspelled"), "did you mean 'quantsink'"),
    "ckpt quant_method missing": (ev("@q_no_method"), "quant_method None is not a quantization method"),
    "ckpt unknown key": (ev("@q_unknown_key"), "unknown key(s) ['colour']"),
    "ckpt version 2": (ev("@q_version2"), "version 2 is not supported"),
    "ckpt weights bits 5": (ev("@q_bits5"), "weights.bits=5 is not supported"),
    "ckpt weights group 7": (ev("@q_group7"), "weights.group_size=7 is not supported"),
    "ckpt weights unknown key": (ev("@q_weights_key"), "quantization_config.weights: unknown key(s) ['bitz']"),
    "ckpt weights a list": (ev("@q_weights_list"), "weights: expected a mapping"),
    "ckpt weights bits a string": (ev("@q_weights_str"), "weights.bits: expected int"),
    "ckpt kv_cache bits 3": (ev("@q_kv_bits3"), "key_bits=3"),
    "ckpt sink map unknown key": (ev("@q_sinkmap_key"), "sink map: unknown key(s) ['where']"),
    "ckpt module the model lacks": (ev("@q_module_missing"), "'model.layers.7.mlp.up_proj', which LlamaForCausalLM"),
    "ckpt module misspelled": (ev("@q_module_typo"), "'model.layers.0.self_attn.qq_proj', which"),
    "ckpt modules a string": (ev("@q_modules_str"), "modules must be a list of module names"),
    "ckpt modules without weights": (ev("@q_modules_no_weights"), "but has no weights section"),
    "ckpt quantization_config a string": (ev("@q_not_object"), "quantization_config must be a JSON object"),
    # config.json: never reported as a tokenizer problem
    "config unknown model_type": (ev("@cfg_model_type"), "is not a usable Hugging Face config"),
    "config without model_type": (ev("@cfg_no_model_type"), "is not a usable Hugging Face config"),
    "config of another architecture": (ev("@cfg_bert"), "44 weight(s) the model needs are missing from"),
    "config not a causal LM": (ev("@cfg_t5"), "does not load as a causal language model"),
    "config a JSON list": (ev("@cfg_list"), "is not a JSON object"),
    "config not UTF-8": (ev("@cfg_nonutf8"), "not UTF-8"),
    "weights missing a tensor": (ev("@missing_tensor"), "missing from"),
    "weights of the wrong shape": (ev("@wrong_shape"), "1 weight(s) the model needs are of the wrong shape"),
    # re-quantizing an export
    "requantize quantsink export": (q("@q"), "is already quantized (quant_method 'quantsink')"),
    "requantize compressed-tensors export": (q("@ct"), "is already quantized (quant_method 'compressed-tensors')"),
    "requantize edited export": (q("@q_unknown_key"), "is already quantized"),
    # --calibration artifacts
    "artifact without calibration.json": (q("@tiny", "--calibration", "@cal_nojson"), "no calibration.json"),
    "artifact without stats": (q("@tiny", "--calibration", "@cal_nostats"), "but no stats.safetensors"),
    "artifact json garbage": (q("@tiny", "--calibration", "@cal_badjson"), "not valid JSON"),
    "artifact json not UTF-8": (q("@tiny", "--calibration", "@cal_nonutf8"), "not UTF-8"),
    "artifact json a list": (q("@tiny", "--calibration", "@cal_list"), "calibration version None"),
    "artifact version 2": (q("@tiny", "--calibration", "@cal_v2"), "calibration version 2"),
    "artifact without sink map": (q("@tiny", "--calibration", "@cal_nosinkmap"), "no sink map"),
    "artifact sink map unknown key": (q("@tiny", "--calibration", "@cal_sinkmap_key"), "unknown key(s) ['colour']"),
    "artifact stats garbage": (q("@tiny", "--calibration", "@cal_garbage_stats"), "not a safetensors file"),
    "artifact stats truncated": (q("@tiny", "--calibration", "@cal_trunc_stats"), "truncated"),
    "artifact stats NaN": (q("@tiny", "--calibration", "@cal_nan"),
                           "'act_absmax/model.layers.1.mlp.down_proj' has 1 NaN/Inf"),
    "artifact a file": (q("@tiny", "--calibration", "@afile"), "is not a directory"),
    "artifact missing": (q("@tiny", "--calibration", "@nowhere"), "is not a directory"),
    "eval artifact without sink map": (ev("@tiny", "--recipe", "kv-int4", "--calibration", "@cal_nosinkmap"),
                                       "no sink map"),
    # non-finite weights and statistics
    "quantize NaN weight rtn": (q("@nan"), "weight 'model.layers.1.mlp.down_proj.weight' has 1 NaN/Inf"),
    "quantize NaN weight gptq": (qcal(model="@nan", recipe="@gptq.yaml"),
                                 "weight 'model.layers.1.mlp.down_proj.weight' has 1 NaN/Inf value(s), "
                                 "first at [2, 5]"),
    "quantize Inf weight": (q("@inf"), "weight 'model.layers.1.self_attn.q_proj.weight' has 1 NaN/Inf"),
    "quantize overflowing activations gptq": (qcal(model="@huge", recipe="@gptq.yaml"), "activations are not "
                                              "finite at the input of model.layers.0.mlp.down_proj"),
    "inspect overflowing activations": (ins("@huge"), "statistic 'act_absmax/model.layers.0.mlp.down_proj' has"),
    "inspect NaN weight": (ins("@nan"), "weight 'model.layers.1.mlp.down_proj.weight' has 1 NaN/Inf"),
    # recipe settings that do not fit the model
    "ignore matches nothing": (q("@tiny", recipe="@ignore.yaml"), "ignore entry 'lm_hed' matches no module"),
    "ignore lists what is allowed": (q("@tiny", recipe="@ignore.yaml"), "e.g. q_proj, k_proj, v_proj, o_proj, "
                                                                        "gate_proj, up_proj, down_proj, lm_head"),
    "ignore second entry": (q("@tiny", recipe="@ignore2.yaml"), "ignore entry 'q_prj' matches no module"),
    "outliers above half the width": (qcal(recipe="@outl40.yaml"), "outlier_channels=40 is more than half"),
    "outliers above the width": (qcal(recipe="@outl100.yaml"), "outlier_channels=100 is more than half"),
    "calib seq len beyond the context": (q("@tiny", "--calib", "@text.txt", "--calib-seq-len", "5000",
                                           recipe="@gptq.yaml"),
                                         "--calib-seq-len 5000 is longer than the model's context of 1024"),
    "recipe seq len beyond the context": (q("@tiny", "--calib", "@text.txt", recipe="@seq.yaml"),
                                          "calibration.seq_len 100000 is longer than the model's context"),
    "inspect seq len beyond the context": (ins("@tiny", "--calib-seq-len", "2048"), "longer than the model's context"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_case_is_one_line_exit_2(case, work, capsys):
    argv, needle = CLI_CASES[case]
    err = run_cli_case(main, argv, needle, work, capsys)
    assert "tokenizer" not in err or "tokenizer" in needle, err


def _gptq_not_pd():
    """A Linear group whose Hessian cannot be factorised (indefinite) hits GPTQ."""
    from quantsink.config import load_recipe
    from quantsink.weights.layer import make_group_quantizer
    from quantsink.weights.groups import InputGroup

    layer = torch.nn.Sequential(torch.nn.Linear(64, 8))
    h = torch.ones(64, 64) * 2 - torch.eye(64)  # diagonal 1, off-diagonal 2: indefinite
    group = InputGroup(["0"], torch.ones(64), h, 16)
    wcfg = load_recipe({"weights": {"algorithm": "gptq", "group_size": 32, "outlier_channels": 0}}).weights
    return make_group_quantizer(wcfg, [], 64)(layer, "model.layers.3", group)


def _quantize(model, **weights):
    from quantsink.weights.api import quantize

    recipe = {"weights": {"algorithm": "rtn", "group_size": 32, "outlier_channels": 0, **weights}}
    return quantize(model, recipe, progress=False)


def _nan_model(value=float("nan")):
    model = tm.build("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[1, 1] = value
    return model


def _loaded_export(work):
    from quantsink.weights.api import load

    return load(work / "q")[0]


def api_cases(work):
    from quantsink.calibration import CalibrationResult, calibrate
    from quantsink.calibration.report import write_report_dir
    from quantsink.weights.api import load
    from quantsink.weights.hf_quantizer import QuantsinkConfig

    def nan_report():
        cal = CalibrationResult.load(work / "cal")
        cal.massive = [{"layer": 0, "channel": 1, "value": float("inf"), "ratio_to_median": 1.0, "positions": [0]}]
        write_report_dir(cal, work / "rep", plots=False)

    return {
        "gptq indefinite Hessian named": (_gptq_not_pd, "GPTQ failed at model.layers.3.0"),
        "quantize NaN weight": (lambda: _quantize(_nan_model()), "'model.layers.0.self_attn.o_proj.weight' has 1"),
        "quantize -Inf weight": (lambda: _quantize(_nan_model(float("-inf"))), "first at [1, 1]"),
        "quantize ignore typo": (lambda: _quantize(tm.build("llama"), ignore=["down_prj"]), "'down_prj' matches no"),
        "quantize outliers above half": (lambda: _quantize(tm.build("llama"), outlier_channels=33), "0..32"),
        "quantize windows beyond the context": (lambda: _quantize_windows(2000), "longer than the model's context"),
        "quantize a loaded export": (lambda: _quantize(_loaded_export(work)), "already quantized"),
        "calibrate windows beyond the context": (lambda: calibrate(tm.build("llama"), None, tm.token_ids(1100),
                                                                   progress=False), "context of 1024"),
        "report with Inf statistic": (nan_report, "massive[0].value is inf"),
        "config unknown kwarg": (lambda: QuantsinkConfig(weights=None, colour=1), "unknown key(s) ['colour']"),
        "config bad weights": (lambda: QuantsinkConfig(weights={"bits": 3}), "weights.bits=3"),
        "load edited export": (lambda: load(work / "q_misspelled"), "did you mean 'quantsink'"),
        "artifact NaN statistic": (lambda: CalibrationResult.load(work / "cal_nan"), "has 1 NaN/Inf"),
    }


def _quantize_windows(length: int):
    from quantsink.weights.api import quantize

    recipe = {"weights": {"algorithm": "gptq", "group_size": 32, "outlier_channels": 0}}
    return quantize(tm.build("llama"), recipe, calib=tm.token_ids(length), progress=False)


API_NAMES = sorted(["gptq indefinite Hessian named", "quantize NaN weight", "quantize -Inf weight",
                    "quantize ignore typo", "quantize outliers above half", "quantize windows beyond the context",
                    "quantize a loaded export", "calibrate windows beyond the context", "report with Inf statistic",
                    "config unknown kwarg", "config bad weights", "load edited export", "artifact NaN statistic"])


@pytest.mark.parametrize("case", API_NAMES)
def test_api_case_raises_one_line(case, work):
    fn, needle = api_cases(work)[case]
    with pytest.raises(QuantsinkError) as err:
        fn()
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg
    assert not (work / "rep").exists()
