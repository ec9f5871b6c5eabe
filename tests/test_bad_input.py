"""Bad input never ends in a traceback, a silent guess, a runaway or a half-written directory.

Every case runs the CLI in-process (exit code 2, one line on stderr naming the problem and what
is allowed, nothing left in the work directory) or the Python API (a ``QuantsinkError`` with the
same one line). Signal and memory-bounded cases run in a child process (test_bad_input_signals.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from bad_input_util import run_cli_case
from quantsink.cli import main
from quantsink.errors import QuantsinkError

W4 = "name: tiny\nweights:\n  bits: 4\n  group_size: 32\n  algorithm: rtn\n  outlier_channels: 0\n"
KV = "name: kv\nkv_cache:\n  key_bits: 4\n  value_bits: 4\n  key_group_size: 16\n  value_group_size: 16\n  window: 16\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A directory with a tiny model, text files and recipes the cases refer to by name."""
    root = tmp_path_factory.mktemp("bad")
    tm.save("llama", root / "tiny")
    tm.save(tm.REFUSED_FALCON, root / "falcon")
    files = {
        "text.txt": "The quick brown fox jumps over the lazy dog.\n" * 60,
        "short.txt": "too short",
        "empty.txt": "  \n",
        "w4.yaml": W4, "kv.yaml": KV,
        "dup.yaml": W4 + "weights:\n  bits: 8\n",
        "nosection.yaml": "name: nothing\n",
        "badyaml.yaml": "weights: [unclosed\n",
        "unknown.yaml": W4 + "  colour: blue\n",
        "floatint.yaml": KV + "  max_cache_tokens: 1.5\n",
        "strint.yaml": KV.replace("window: 16", "window: big"),
        "version.yaml": "version: 2\n" + W4,
        "sinks.yaml": KV + "  num_sinks: 1000000000\n",
        "bigroup.yaml": KV.replace("key_group_size: 16", "key_group_size: 100000"),
        "text.jsonl": '{"text": 42}\n',
        "nonutf8.txt": None, "nonutf8.yaml": None,
    }
    for name, text in files.items():
        if text is None:
            (root / name).write_bytes(b"caf\xe9 \xff\xfe text\n" * 20)
        else:
            (root / name).write_text(text, encoding="utf-8")
    (root / "adir.yaml").mkdir()
    (root / "notjson").mkdir()
    (root / "notjson" / "config.json").write_text("{not json")
    (root / "garbage").mkdir()
    (root / "garbage" / "config.json").write_text('{"model_type": "llama"}')
    (root / "garbage" / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"garbage!")
    (root / "trunc").mkdir()
    for f in (root / "tiny").iterdir():
        (root / "trunc" / f.name).write_bytes(f.read_bytes())
    st = root / "trunc" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    (root / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 12)
    (root / "notgguf.gguf").write_bytes(b"NOPE" + b"\x00" * 12)
    (root / "afile").write_text("x")
    (root / "notckpt").mkdir()
    (root / "notckpt" / "keep.txt").write_text("my files")
    return root


QUANTIZE = ["quantize", "--model", "@tiny", "--calib", "@text.txt", "--calib-seq-len", "64", "--calib-samples", "2"]
EVAL = ["eval", "--model", "@tiny", "--data", "@text.txt", "--ctx", "64", "--max-tokens", "128", "--no-progress"]
INSPECT = ["inspect", "--model", "@tiny", "--calib", "@text.txt", "--calib-seq-len", "64", "--calib-samples", "2",
           "--no-plots", "--no-progress"]


def q(*extra: str, recipe: str = "@w4.yaml", out: str = "@out") -> list[str]:
    return QUANTIZE + ["--recipe", recipe, "--out", out, *extra]


CLI_CASES = {
    # recipes
    "recipe unknown name": (q(recipe="int5-magic"), "unknown recipe"),
    "recipe file missing": (q(recipe="@missing.yaml"), "does not exist"),
    "recipe is a directory": (q(recipe="@adir.yaml"), "is a directory"),
    "recipe not UTF-8": (q(recipe="@nonutf8.yaml"), "not UTF-8"),
    "recipe not YAML": (q(recipe="@badyaml.yaml"), "not valid YAML"),
    "recipe duplicate key": (q(recipe="@dup.yaml"), "duplicate key"),
    "recipe unknown key": (q(recipe="@unknown.yaml"), "unknown key"),
    "recipe no section": (q(recipe="@nosection.yaml"), "neither a weights nor a kv_cache"),
    "recipe version 2": (q(recipe="@version.yaml"), "version 2"),
    "recipe float for int|None": (q(recipe="@floatint.yaml"), "max_cache_tokens: expected int"),
    "recipe string for int": (q(recipe="@strint.yaml"), "window: expected int"),
    "recipe a billion sinks": (q(recipe="@sinks.yaml"), "num_sinks must be in 0..4096"),
    "recipe huge key group": (q(recipe="@bigroup.yaml"), "key_group_size must be in 1..1024"),
    # calibration data
    "calib missing": (QUANTIZE[:4] + ["@nope.txt"] + QUANTIZE[5:] + ["--recipe", "@w4.yaml", "--out", "@out"],
                      "does not exist"),
    "calib not UTF-8": (QUANTIZE[:4] + ["@nonutf8.txt"] + QUANTIZE[5:] + ["--recipe", "@w4.yaml", "--out", "@out"],
                        "not UTF-8"),
    "calib jsonl text is a number": (QUANTIZE[:4] + ["@text.jsonl"] + QUANTIZE[5:] + ["--recipe", "@w4.yaml",
                                                                                    "--out", "@out"],
                                     "string 'text' field"),
    "calib empty": (QUANTIZE[:4] + ["@empty.txt"] + QUANTIZE[5:] + ["--recipe", "@w4.yaml", "--out", "@out"],
                    "is empty"),
    "calib shorter than a window": (QUANTIZE[:4] + ["@short.txt"] + QUANTIZE[5:] + ["--recipe", "@w4.yaml",
                                                                                  "--out", "@out"], "shorter"),
    "calib samples 0": (q("--calib-samples", "0"), "--calib-samples must be in 1..4096"),
    "calib samples a million": (q("--calib-samples", "1000000"), "--calib-samples must be in 1..4096"),
    "calib seq len 0": (q("--calib-seq-len", "0"), "--calib-seq-len must be >= 2"),
    # output directory
    "out is a file": (q(out="@afile"), "existing file"),
    "out exists": (q(out="@notckpt"), "already exists"),
    "out not a checkpoint with force": (q("--force", out="@notckpt"), "not a quantsink checkpoint"),
    "out parent missing": (q(out="@no/such/dir"), "parent directory"),
    # models
    "model path missing": (["quantize", "--model", "@nowhere/model", "--recipe", "@w4.yaml", "--calib", "@text.txt",
                            "--out", "@out"], "does not exist"),
    "model unknown alias": (["quantize", "--model", "llama-9000", "--recipe", "@w4.yaml", "--calib", "@text.txt",
                             "--out", "@out"], "unknown model alias"),
    "model config not JSON": (["eval", "--model", "@notjson", "--data", "@text.txt"], "not valid JSON"),
    "model garbage safetensors": (["eval", "--model", "@garbage", "--data", "@text.txt"], "not a safetensors file"),
    "model truncated safetensors": (["eval", "--model", "@trunc", "--data", "@text.txt"], "truncated"),
    "model garbage gguf": (["eval", "--model", "@bad.gguf", "--data", "@text.txt"], "truncated or corrupt"),
    "model not a gguf": (["eval", "--model", "@notgguf.gguf", "--data", "@text.txt"], "GGUF magic"),
    "model falcon with the sink cache": (EVAL[:2] + ["@falcon"] + EVAL[3:] + ["--recipe", "@kv.yaml"],
                                         tm.REFUSED[tm.REFUSED_FALCON]),
    # eval
    "eval ctx 0": (EVAL + ["--ctx", "0"], "--ctx must be >= 2"),
    "eval ctx 1": (EVAL + ["--ctx", "1"], "--ctx must be >= 2"),
    "eval ctx negative": (EVAL + ["--ctx", "-4"], "--ctx must be >= 2"),
    "eval ctx beyond the context": (EVAL + ["--ctx", "5000", "--max-tokens", "5000"], "longer than the model's context"),
    "eval max tokens below ctx": (EVAL + ["--max-tokens", "10"], "shorter than one window"),
    "eval data missing": (["eval", "--model", "@tiny", "--data", "@nope.txt"], "does not exist"),
    "eval data is a directory": (["eval", "--model", "@tiny", "--data", "@adir.yaml/"], "is a directory"),
    "eval data shorter than ctx": (EVAL[:4] + ["@short.txt"] + EVAL[5:], "fewer than one window"),
    "eval json dir missing": (EVAL + ["--json", "@no/r.json"], "directory must exist"),
    "eval json is a dir": (EVAL + ["--json", "@adir.yaml"], "must not be a directory"),
    "eval window without recipe": (EVAL + ["--window", "0"], "--window needs --recipe"),
    "eval calibration without recipe": (EVAL + ["--calibration", "@tiny"], "--calibration needs --recipe"),
    "eval weights-only recipe": (EVAL + ["--recipe", "@w4.yaml"], "has no kv_cache section"),
    "eval window shorter than a group": (EVAL + ["--recipe", "@kv.yaml", "--window", "8"], "shorter than one key group"),
    # inspect
    "inspect out is a file": (INSPECT + ["--out", "@afile"], "is a file"),
    "inspect out not a report": (INSPECT + ["--out", "@notckpt"], "not a quantsink report"),
    "inspect samples 0": (INSPECT + ["--out", "@rep", "--calib-samples", "0"], "--calib-samples must be in 1..4096"),
    "inspect calib missing": (INSPECT[:4] + ["@nope.txt"] + INSPECT[5:] + ["--out", "@rep"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_case_is_one_line_exit_2(case, work, capsys):
    argv, needle = CLI_CASES[case]
    run_cli_case(main, argv, needle, work, capsys)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("quantsink ")


def kv(**kw):
    from quantsink.kv.config import KVConfig

    return KVConfig(**kw)


def api_cases():
    from quantsink.config import load_recipe
    from quantsink.data import calibration_windows, load_text
    from quantsink.eval import perplexity
    from quantsink.kv.cache import SinkQuantCache

    model = tm.build("llama")
    return {
        "kv key bits 3": (lambda: kv(key_bits=3), "key_bits=3"),
        "kv value bits 16": (lambda: kv(value_bits=16), "value_bits=16"),
        "kv negative window": (lambda: kv(window=-1), "window must be >= 0"),
        "kv window below a group": (lambda: kv(window=8, key_group_size=16), "shorter than one key group"),
        "kv outliers too many": (lambda: kv(key_outliers=40, key_group_size=64), "key_outliers=40"),
        "kv dense dtype": (lambda: kv(dense_dtype="fp8"), "dense_dtype"),
        "kv cache too small": (lambda: kv(num_sinks=64, window=64, max_cache_tokens=100), "max_cache_tokens=100"),
        "kv occurrences 0": (lambda: kv(content_sink_occurrences=0), "content_sink_occurrences"),
        "kv content sinks without map": (lambda: SinkQuantCache(kv(content_sinks=True), 2), "needs a calibrated"),
        "cache layers mismatch": (lambda: SinkQuantCache(kv(), 5).attach(model), "has 5 layers"),
        "cache unattached": (lambda: model(tm.token_ids(4), **tm.cache_kwargs(model, SinkQuantCache(kv(), 2))),
                             "not attached"),
        "cache backend": (lambda: SinkQuantCache(kv(), 2, backend="gpu"), "backend 'gpu'"),
        "recipe dict unknown key": (lambda: load_recipe({"weights": {"bitz": 4}}), "unknown key"),
        "recipe dict empty": (lambda: load_recipe({"name": "x"}), "neither a weights"),
        "windows from text without tokenizer": (lambda: calibration_windows(None, "x", samples=0), "must be >= 1"),
        "load text directory": (lambda: load_text(Path("/")), "is a directory"),
        "perplexity window 1": (lambda: perplexity(model, torch.arange(10), ctx=1, progress=False), "must be >= 2"),
        "perplexity too few tokens": (lambda: perplexity(model, torch.arange(10), ctx=64, progress=False),
                                      "need at least 64 tokens"),
    }


API_NAMES = sorted(["kv key bits 3", "kv value bits 16", "kv negative window", "kv window below a group",
                    "kv outliers too many", "kv dense dtype", "kv cache too small", "kv occurrences 0",
                    "kv content sinks without map", "cache layers mismatch", "cache unattached", "cache backend",
                    "recipe dict unknown key", "recipe dict empty", "windows from text without tokenizer",
                    "load text directory", "perplexity window 1", "perplexity too few tokens"])


@pytest.mark.parametrize("case", API_NAMES)
def test_api_case_raises_one_line(case):
    fn, needle = api_cases()[case]
    with pytest.raises(QuantsinkError) as err:
        fn()
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg


def test_nan_model_loss_is_an_error():
    from quantsink.eval import perplexity

    model = tm.build("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(QuantsinkError, match="not finite"):
        perplexity(model, tm.token_ids(128)[0], ctx=64, progress=False)


def test_killed_writer_leftovers_are_removed(tmp_path):
    from quantsink._fs import staged_dir

    dead = tmp_path / f".out.tmp-{2**22 + 12345}-abc"  # a PID that does not run
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / f".out.tmp-{os.getpid()}-xyz"  # this process's own: kept
    mine.mkdir()
    with staged_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert not dead.exists() and mine.exists() and json.loads("1") == 1
    assert (tmp_path / "out" / "a").read_text() == "1"
