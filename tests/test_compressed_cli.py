"""`quantsink quantize --format compressed-tensors`: bad requests are one line, exit 2, no directory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny_models as tm
from quantsink.cli import main

RTN = """name: tiny-ct-rtn
version: 1
weights:
  bits: 4
  group_size: 128
  symmetric: true
  algorithm: rtn
  outlier_channels: 0
"""


@pytest.fixture(scope="module")
def tiny192(tmp_path_factory) -> Path:
    """A saved tiny Llama whose 192-wide layers groups of 128 cannot cover."""
    path = tmp_path_factory.mktemp("tiny") / "llama192"
    tm.save("llama", path, hidden_size=192, head_dim=48, intermediate_size=256)
    return path


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(["quantize", *args])
    except SystemExit as exc:  # argparse errors
        code = int(exc.code)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_unknown_format(tmp_path: Path, capsys) -> None:
    code, _, err = _run(["--recipe", "w4-ct-g128", "--out", str(tmp_path / "o"), "--format", "gguf"], capsys)
    _one_line_error(code, err, "--format", "compressed-tensors")
    assert not (tmp_path / "o").exists()


def test_outlier_recipe_refused_before_any_work(tmp_path: Path, capsys) -> None:
    code, _, err = _run(["--recipe", "int4-sink", "--calib", "x.txt", "--out", str(tmp_path / "o"),
                         "--format", "compressed-tensors"], capsys)
    _one_line_error(code, err, "outlier_channels=16", "--drop-outliers", "allowed")
    assert list(tmp_path.iterdir()) == []


def test_drop_outliers_needs_the_compressed_format(tmp_path: Path, capsys) -> None:
    code, _, err = _run(["--recipe", "int4-sink", "--calib", "x.txt", "--out", str(tmp_path / "o"),
                         "--drop-outliers"], capsys)
    _one_line_error(code, err, "--drop-outliers", "--format compressed-tensors")


def test_group_size_the_layers_cannot_hold(tiny192: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "r.yaml").write_text(RTN)
    code, _, err = _run(["--model", str(tiny192), "--recipe", str(tmp_path / "r.yaml"), "--out",
                         str(tmp_path / "o"), "--format", "compressed-tensors", "--quiet"], capsys)
    _one_line_error(code, err, "group_size=128", "in_features=192", "64 or 32", "--group-fallback")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_group_fallback_writes_two_config_groups(tiny192: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "r.yaml").write_text(RTN)
    out = tmp_path / "o"
    code, stdout, err = _run(["--model", str(tiny192), "--recipe", str(tmp_path / "r.yaml"), "--out",
                              str(out), "--format", "compressed-tensors", "--group-fallback",
                              "--quiet"], capsys)
    assert code == 0, err
    assert "vllm serve" in stdout
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert [g["weights"]["group_size"] for g in qc["config_groups"].values()] == [128, 64]
    assert json.loads((out / "quantsink.json").read_text())["layers_per_group_size"] == {"128": 2, "64": 12}
