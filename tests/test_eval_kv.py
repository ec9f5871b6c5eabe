"""KV-faithful perplexity and the `quantsink eval` command on the real model."""
from __future__ import annotations

import json

import pytest

from quantsink.cli import main
from quantsink.data import eval_tokens
from quantsink.eval import perplexity
from quantsink.kv.config import KVConfig
from quantsink.hf.forward import cache_kwargs

pytestmark = pytest.mark.model


def test_kv_perplexity_bounds(smollm, test_path) -> None:
    model, tok = smollm
    ids = eval_tokens(tok, test_path, 512)
    fp = perplexity(model, ids, 256, progress=False)
    int8 = perplexity(model, ids, 256, progress=False,
                      kv=KVConfig(key_bits=8, value_bits=8, window=0))
    int2 = perplexity(model, ids, 256, progress=False,
                      kv=KVConfig(key_bits=2, value_bits=2, window=0))
    assert abs(int8["ppl"] / fp["ppl"] - 1) < 0.01
    assert int2["ppl"] > int8["ppl"] * 1.05  # 2 bits really costs something
    assert 2.5 < int2["kv_avg_bits"] < int8["kv_avg_bits"] - 4 and int8["kv_avg_bits"] > 8.5


def test_eval_cli_json(test_path, tmp_path, capsys, smollm) -> None:
    out = tmp_path / "r.json"
    rc = main(["eval", "--recipe", "kv-int4-sink", "--window", "0", "--data", str(test_path),
               "--ctx", "256", "--max-tokens", "512", "--json", str(out), "--no-progress"])
    assert rc == 0 and "ppl" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert {"ppl", "tokens", "kv_avg_bits", "window"} <= set(res)
    assert res["tokens"] == 512 and res["window"] == 0 and res["ppl"] < 100


def test_eval_cli_bad_window(test_path, capsys) -> None:
    rc = main(["eval", "--recipe", "kv-int2-sink", "--window", "10", "--data", str(test_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "window=10" in err and err.count("\n") == 1


def test_eval_cli_bad_calibration(test_path, tmp_path, capsys) -> None:
    rc = main(["eval", "--recipe", "kv-int2-sink", "--calibration", str(tmp_path), "--data", str(test_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "is not a calibration artifact" in err and err.count("\n") == 1


def test_content_sinks_on_the_real_model(smollm, test_path) -> None:
    """The first " the" of a window (a calibrated content sink of SmolLM2) is kept in fp16."""
    import dataclasses

    import torch

    from quantsink.calibration.sinkmap import SinkMap
    from quantsink.kv.cache import SinkQuantCache

    model, tok = smollm
    ids = eval_tokens(tok, test_path, 256)
    the = tok(" the")["input_ids"][0]
    cfg = KVConfig(key_bits=2, value_bits=2, window=0, rotate=True, value_symmetric=True, content_sinks=True)
    cache = SinkQuantCache.from_recipe(model, cfg, sink_map=SinkMap(positional=[0, 1, 2, 3],
                                                                     content_token_ids=[the]))
    with torch.no_grad():
        model(ids[None], **cache_kwargs(model, cache))
    first = int((ids == the).nonzero()[0, 0])
    assert cache.layers[5].sink_pos == [0, 1, 2, 3, first]
    plain = perplexity(model, ids, 256, progress=False, kv=dataclasses.replace(cfg, content_sinks=False))
    assert cache.avg_bits() > plain["kv_avg_bits"]  # the extra fp16 token is counted


def test_eval_cli_json_in_missing_directory(test_path, tmp_path, capsys) -> None:
    """Checked before the model loads: one line, exit 2, nothing written."""
    target = tmp_path / "missing" / "r.json"
    rc = main(["eval", "--data", str(test_path), "--json", str(target)])
    err = capsys.readouterr().err
    assert rc == 2 and "--json" in err and err.count("\n") == 1 and not target.parent.exists()
