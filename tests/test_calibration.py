"""Calibration detection rules on synthetic tensors (no model): planted sinks and massive
channels are found, uniform attention and Gaussian activations give none."""
from __future__ import annotations

import json

import pytest
import torch

from quantsink.calibration import CalibrationResult, SinkMap, Thresholds
from quantsink.calibration.calibrate import finalize
from quantsink.calibration.collect import Collector
from quantsink.calibration.detect import (far_mass, find_massive, find_positional_sinks, leading_mass,
                                          leading_prefix, uniform_share)
from quantsink.calibration.report import build_report, format_table, layer_ranges
from quantsink.errors import QuantsinkError

B, H, HKV, L, D, C, V = 8, 4, 2, 128, 8, 32, 60
SINK_TOKEN = 7


class FakeTokenizer:
    def decode(self, ids: list[int]) -> str:
        return f"<{ids[0]}>"


def causal_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax of [B, H, L, L] logits under a causal mask."""
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    return logits.masked_fill(future, float("-inf")).softmax(-1)


def synthetic_ids(gen: torch.Generator) -> torch.Tensor:
    """[B, L] ids in [10, V) with SINK_TOKEN planted once per window at a random position >= 8."""
    ids = torch.randint(10, V, (B, L), generator=gen)
    spots = torch.randint(8, 64, (B,), generator=gen)
    ids[torch.arange(B), spots] = SINK_TOKEN
    return ids


def planted_logits(ids: torch.Tensor, gen: torch.Generator, position0: float, content: float) -> torch.Tensor:
    """Random logits with extra weight on key 0 and on keys holding SINK_TOKEN."""
    logits = 0.5 * torch.randn(B, H, L, L, generator=gen)
    logits[..., 0] += position0
    logits += content * (ids == SINK_TOKEN).float()[:, None, None, :]
    return logits


def run_collector(layer_logits: list[torch.Tensor], ids: torch.Tensor, hidden: list[torch.Tensor],
                  keys: torch.Tensor, th: Thresholds = Thresholds()) -> CalibrationResult:
    col = Collector(len(layer_logits), V, th)
    col.begin_batch(ids)
    for layer, logits in enumerate(layer_logits):
        col.observe_attention(layer, causal_probs(logits), keys)
        col.observe_hidden(layer, hidden[layer])
    return finalize(col, FakeTokenizer(), "synthetic", {"samples": B, "seq_len": L})


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_uniform_share_matches_brute_force() -> None:
    want = [sum(1 / (i + 1) for i in range(p, L)) / (L - p) for p in range(5)]
    assert torch.allclose(uniform_share(L, 5), torch.tensor(want), rtol=1e-6)


@pytest.mark.parametrize("seq,window", [(50, 8), (5, 8), (33, 1)])
def test_far_mass_matches_brute_force(seq: int, window: int, gen: torch.Generator) -> None:
    logits = torch.randn(3, seq, seq, generator=gen)
    probs = logits.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    mass, ratio, count = far_mass(probs, window)
    pos = torch.arange(seq)
    far = ((pos[:, None] - pos[None, :]) >= window).float()  # [Lq, Lk]
    want_count = far.sum(0)
    torch.testing.assert_close(count, want_count)
    torch.testing.assert_close(mass, (probs * far).sum(1) / want_count.clamp(min=1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ratio, (probs * far * (pos[:, None] + 1)).sum(1) / want_count.clamp(min=1),
                               atol=1e-5, rtol=1e-5)


def test_uniform_attention_has_ratio_one_and_uniform_leading_mass() -> None:
    probs = causal_probs(torch.zeros(1, 1, L, L))
    _, ratio, count = far_mass(probs.mean(1), local_window=8)
    assert torch.allclose(ratio[0, count > 0], torch.ones(int((count > 0).sum())), atol=1e-5)
    assert torch.allclose(leading_mass(probs, 4)[0, 0], uniform_share(L, 4), atol=1e-6)


def test_planted_sinks_found_and_uniform_layer_clean(gen: torch.Generator) -> None:
    ids = synthetic_ids(gen)
    logits = [torch.zeros(B, H, L, L), planted_logits(ids, gen, position0=6.0, content=5.0)]
    hidden = [torch.randn(B, L, C, generator=gen) for _ in logits]
    result = run_collector(logits, ids, hidden, torch.randn(B, HKV, L, D, generator=gen))
    sm = result.sink_map
    assert sm.positional == [0]
    assert [r["layers"] for r in sm.positional_detail] == [[1]]
    assert sm.positional_detail[0]["mass"][0] > 0.3
    assert sm.content_token_ids == [SINK_TOKEN]
    assert sm.content_detail[0]["layers"] == [1]
    assert sm.content_detail[0]["ratio_to_uniform"][0] > Thresholds().content_ratio
    assert sm.positions_for_layer(0) == [] and sm.positions_for_layer(1) == [0]
    assert result.massive == []  # Gaussian activations


def test_uniform_attention_gives_no_sink(gen: torch.Generator) -> None:
    ids = synthetic_ids(gen)
    logits = [torch.zeros(B, H, L, L), 0.3 * torch.randn(B, H, L, L, generator=gen)]
    hidden = [torch.randn(B, L, C, generator=gen) for _ in logits]
    result = run_collector(logits, ids, hidden, torch.randn(B, HKV, L, D, generator=gen))
    assert result.sink_map.positional == []
    assert result.sink_map.positional_detail == [] and result.sink_map.content_detail == []


def test_content_sink_at_a_fixed_position_is_not_positional(gen: torch.Generator) -> None:
    ids = torch.randint(10, V, (B, L), generator=gen)
    ids[:, 5] = SINK_TOKEN  # the same token at the same position in every window
    logits = [planted_logits(ids, gen, position0=0.0, content=5.0)]
    masses = leading_mass(causal_probs(logits[0]), 8).mean(1)  # [B, P]
    assert (masses[:, 5] > 0.05).all()
    result = run_collector(logits, ids, [torch.randn(B, L, C, generator=gen)], torch.randn(B, HKV, L, D))
    assert 5 not in [r["position"] for r in result.sink_map.positional_detail]


def test_massive_channel_found_gaussian_clean(gen: torch.Generator) -> None:
    hidden = torch.randn(B, L, C, generator=gen)
    _, rows = find_massive(hidden, ratio=100.0)
    assert rows == []
    hidden[:, 0, 5] = -1000.0
    hidden[3, 17, 5] = 500.0
    median, rows = find_massive(hidden, ratio=100.0)
    assert [r["channel"] for r in rows] == [5]
    assert rows[0]["value"] == -1000.0 and rows[0]["positions"] == [0, 17]
    assert rows[0]["ratio_to_median"] == pytest.approx(1000.0 / median)
    assert rows[0]["ratio_to_median"] > 100


def test_massive_rows_merged_over_layers(gen: torch.Generator) -> None:
    ids = synthetic_ids(gen)
    logits = [torch.zeros(B, H, L, L)] * 2
    hidden = [torch.randn(B, L, C, generator=gen) for _ in logits]
    hidden[1][:, 0, 3] = 2000.0
    result = run_collector(logits, ids, hidden, torch.randn(B, HKV, L, D))
    assert [(r["layer"], r["channel"], r["positions"]) for r in result.massive] == [(1, 3, [0])]
    assert result.massive[0]["ratio_to_median"] > 1000
    assert "3" in format_table(result)


def test_key_ranges_exclude_positional_sink(gen: torch.Generator) -> None:
    ids = synthetic_ids(gen)
    keys = torch.randn(B, HKV, L, D, generator=gen).clamp(-3, 3)
    keys[:, 1, 0, 2] = 50.0  # an outlier key channel at the sink position only
    logits = [planted_logits(ids, gen, position0=6.0, content=0.0)]
    result = run_collector(logits, ids, [torch.randn(B, L, C)], keys)
    assert result.sink_map.positional == [0]
    kmax = result.stats["key_absmax/0"]
    assert kmax.shape == (HKV, D) and 2.0 < kmax.max() <= 3.0
    assert result.stats["key_lead_absmax/0"][0, 1, 2] == 50.0
    assert not any(k.startswith(("key_min/", "key_max/", "value_min/", "value_max/")) for k in result.stats)


def test_leading_prefix_and_positional_rows() -> None:
    assert leading_prefix([{"position": 0}, {"position": 1}, {"position": 3}]) == [0, 1]
    assert leading_prefix([{"position": 2}]) == []
    mass = torch.full((3, 4), 0.001)
    mass[2, 0] = 0.5
    rows = find_positional_sinks(mass, 64, Thresholds())
    assert rows == [{"position": 0, "layers": [2], "mass": [0.5]}]
    assert layer_ranges([2, 3, 4, 7, 9, 10]) == "2-4,7,9-10"


def test_sink_map_round_trip_and_validation() -> None:
    sm = SinkMap(positional=[1, 0, 0], content_token_ids=[260], num_layers=30,
                 content_detail=[{"token_id": 260, "token": " the", "layers": [3], "mass": [0.2]}])
    assert sm.positional == [0, 1]
    again = SinkMap.from_dict(json.loads(json.dumps(sm.to_dict())))
    assert again == sm and again.content_ids_for_layer(3) == [260] and again.content_ids_for_layer(4) == []
    assert SinkMap.first(4).positional == [0, 1, 2, 3] and SinkMap.first(0).positional == []
    with pytest.raises(QuantsinkError):
        SinkMap.first(-1)
    with pytest.raises(QuantsinkError, match="unknown key"):
        SinkMap.from_dict({"positional": [0], "sinks": []})


def test_artifact_round_trip_and_bad_version(tmp_path, gen: torch.Generator) -> None:
    ids = synthetic_ids(gen)
    logits = [planted_logits(ids, gen, position0=6.0, content=5.0)]
    result = run_collector(logits, ids, [torch.randn(B, L, C)], torch.randn(B, HKV, L, D))
    out = result.save(tmp_path / "calib")
    loaded = CalibrationResult.load(out)
    assert loaded.sink_map == result.sink_map and loaded.massive == result.massive
    assert loaded.stats.keys() == result.stats.keys()
    assert all(torch.equal(loaded.stats[k], result.stats[k].float()) for k in result.stats)
    assert json.loads((out / "calibration.json").read_text())["version"] == 1
    report = build_report(loaded)
    assert {"model", "num_layers", "sinks", "massive_activations"} <= report.keys()
    meta = json.loads((out / "calibration.json").read_text())
    meta["version"] = 99
    (out / "calibration.json").write_text(json.dumps(meta))
    with pytest.raises(QuantsinkError, match="version 99"):
        CalibrationResult.load(out)
    with pytest.raises(QuantsinkError, match="not a calibration artifact"):
        CalibrationResult.load(tmp_path)
