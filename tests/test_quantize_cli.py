"""`quantsink quantize`: bad inputs give one line, exit code 2 and no directory; a small run works."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantsink.cli import main

W4_RTN = """name: tiny
version: 1
weights:
  bits: 4
  group_size: 128
  algorithm: rtn
  outlier_channels: 0
  clip_search: false
"""


def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main(["quantize", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_out_is_existing_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "f").write_text("x")
    code, err = _run(["--recipe", "int4-sink", "--calib", "x.txt", "--out", str(tmp_path / "f")], capsys)
    _one_line_error(code, err, "existing file", "allowed")


def test_out_existing_dir_needs_force(tmp_path: Path, capsys) -> None:
    (tmp_path / "d").mkdir()
    code, err = _run(["--recipe", "int4-sink", "--calib", "x.txt", "--out", str(tmp_path / "d")], capsys)
    _one_line_error(code, err, "already exists", "--force")


def test_unknown_recipe_lists_available(tmp_path: Path, capsys) -> None:
    code, err = _run(["--recipe", "int5-magic", "--out", str(tmp_path / "o")], capsys)
    _one_line_error(code, err, "unknown recipe", "int4-sink")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit,needle", [
    (("  outlier_channels: 0\n", "  outlier_channels: 0\n  colour: blue\n"), "unknown key"),
    (("  bits: 4\n", "  bits: 5\n"), "bits=5"),
    (("  group_size: 128\n", "  group_size: 0\n"), "group_size=0"),
])
def test_bad_recipe_yaml(tmp_path: Path, capsys, edit: tuple[str, str], needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(W4_RTN.replace(*edit))
    code, err = _run(["--recipe", str(path), "--out", str(tmp_path / "o")], capsys)
    _one_line_error(code, err, needle, "allowed")
    assert not (tmp_path / "o").exists()


def test_recipe_needing_calibration_without_calib(tmp_path: Path, capsys) -> None:
    code, err = _run(["--recipe", "int4-sink", "--out", str(tmp_path / "o")], capsys)
    _one_line_error(code, err, "needs calibration", "--calib")


@pytest.mark.model
def test_small_run_and_injected_failure(smollm, tmp_path: Path, capsys, monkeypatch) -> None:
    recipe = tmp_path / "w4.yaml"
    recipe.write_text(W4_RTN)
    out = tmp_path / "out"
    code, _ = _run(["--recipe", str(recipe), "--out", str(out), "--quiet"], capsys)
    assert code == 0
    report = json.loads((out / "quantsink_report.json").read_text())
    assert report["quantized_linear_layers"] == 210 and report["linear_ratio_vs_fp16"] < 0.30

    import quantsink.weights.export as ex

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex, "_write_config", broken)
    code, err = _run(["--recipe", str(recipe), "--out", str(tmp_path / "out2"), "--quiet"], capsys)
    _one_line_error(code, err, "nothing was written", "allowed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "w4.yaml"]
