"""`quantsink eval` with the sink cache on tiny saved models: supported families run, others get one line."""
from __future__ import annotations

import json

import pytest

import tiny_models as tm
from quantsink.cli import main


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    return path


@pytest.mark.parametrize("name", [tm.REFUSED_FALCON])
def test_eval_refuses_models_outside_the_attention_interface(name, tmp_path, text, capsys):
    tm.save(name, tmp_path / name)
    capsys.readouterr()
    code = main(["eval", "--model", str(tmp_path / name), "--recipe", "kv-int4-sink", "--data", str(text),
                 "--ctx", "256", "--max-tokens", "512", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and tm.REFUSED[name] in err, err


@pytest.mark.parametrize("name", ["gemma3", "gpt2"])
def test_eval_runs_the_sink_cache(name, tmp_path, text):
    tm.save(name, tmp_path / name)
    out = tmp_path / "r.json"
    code = main(["eval", "--model", str(tmp_path / name), "--recipe", "kv-int4-sink", "--window", "0",
                 "--data", str(text), "--ctx", "256", "--max-tokens", "512", "--json", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert code == 0 and result["tokens"] == 512 and 4 < result["kv_avg_bits"] < 8
