"""Calibration on the real SmolLM2-135M (small: 4 windows x 256 tokens)."""
from __future__ import annotations

import pytest
import torch

from quantsink.calibration import CalibrationResult, calibrate
from quantsink.calibration.collect import ATTN_NAME, calib_attention
from quantsink.hf.attention import custom_attention

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def result(smollm, calib_path) -> CalibrationResult:
    model, tok = smollm
    return calibrate(model, tok, calib_path, samples=4, seq_len=256, seed=0, progress=False,
                     name="smollm2-135m")


def test_position_zero_is_a_sink_in_most_layers(result: CalibrationResult) -> None:
    sm = result.sink_map
    assert sm.positional[:1] == [0]
    row = next(r for r in sm.positional_detail if r["position"] == 0)
    assert len(row["layers"]) >= 15
    assert set(range(12, 30)) <= set(row["layers"])
    assert min(m for l, m in zip(row["layers"], row["mass"]) if l >= 12) > 0.2


def test_channel_507_massive_at_token_zero(result: CalibrationResult) -> None:
    rows = [r for r in result.massive if r["channel"] == 507 and 0 in r["positions"]]
    assert max(abs(r["value"]) for r in rows) >= 10_000
    assert all(r["ratio_to_median"] >= 100 for r in rows)
    assert len({r["layer"] for r in rows}) >= 15


def test_content_sink_in_early_layers(result: CalibrationResult) -> None:
    early = [r for r in result.sink_map.content_detail if set(r["layers"]) & set(range(3, 11))]
    assert early, result.sink_map.content_detail
    assert " the" in [r["token"] for r in early]


def test_stats_cover_every_linear_and_layer(smollm, result: CalibrationResult) -> None:
    model, _ = smollm
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    assert len(linears) == 30 * 7
    for name, mod in linears.items():
        absmax = result.stats[f"act_absmax/{name}"]
        assert absmax.dtype == torch.float32 and absmax.shape == (mod.in_features,)
        assert torch.isfinite(absmax).all() and (absmax > 0).any()
    for layer in range(30):
        keys = result.stats[f"key_absmax/{layer}"]
        assert keys.shape == (3, 64) and (keys > 0).all()
        assert f"learned_sink_mass/{layer}" not in result.stats  # Llama has no learned sinks


def test_artifact_round_trip(tmp_path, result: CalibrationResult) -> None:
    loaded = CalibrationResult.load(result.save(tmp_path / "calib"))
    assert loaded.sink_map == result.sink_map and loaded.massive == result.massive
    assert loaded.model == "smollm2-135m" and loaded.num_layers == 30
    assert all(torch.equal(loaded.stats[k], v) for k, v in result.stats.items())


def test_model_restored_and_calib_attention_matches_sdpa(smollm, result: CalibrationResult) -> None:
    model, tok = smollm
    assert model.config._attn_implementation != ATTN_NAME
    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building.",
              return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        with custom_attention(model, ATTN_NAME, calib_attention):
            ours = model(ids).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-3)
