"""Calibration on the tiny architecture matrix: the calibration attention is the model's own
(sliding windows, softcapping, learned sinks), and the learned sinks' share is reported."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantsink.calibration import calibrate
from quantsink.calibration.collect import ATTN_NAME, attention_for
from quantsink.calibration.report import build_report, format_table
from quantsink.cli import main
from quantsink.hf.attention import custom_attention
from quantsink.hf.support import applies_softcap

import tiny_models as tm


class CharDecode:
    def decode(self, ids: list[int]) -> str:
        return f"<{ids[0]}>"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _sinks(model: torch.nn.Module, value: float) -> torch.nn.Module:
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(value)
    return model


@pytest.mark.parametrize("name", tm.ARCHS + tm.MOE_EXTRA)
def test_calibration_attention_is_the_models_attention(name: str) -> None:
    model = tm.build(name)
    ids = tm.token_ids(96, 2)  # longer than the 16-token sliding windows
    with torch.no_grad():
        want = model(ids).logits
        with custom_attention(model, ATTN_NAME, attention_for(model)):
            got = model(ids).logits
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    assert model.config._attn_implementation != ATTN_NAME  # restored


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_softcap_follows_the_models_implementation(implementation: str) -> None:
    """Gemma 2's softcap is applied by eager attention and dropped by transformers' sdpa."""
    model = tm.build("gemma2")
    try:
        model.set_attn_implementation(implementation)
    except ValueError:  # transformers >= 5.2x refuses sdpa for Gemma 2 (5.17 runs it, without softcap)
        pytest.skip(f"this transformers version refuses {implementation} for Gemma 2")
    ids = tm.token_ids(96, 1)
    with torch.no_grad():
        want = model(ids).logits
        with custom_attention(model, ATTN_NAME, attention_for(model)):
            got = model(ids).logits
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    assert applies_softcap(model) == (implementation == "eager")


def test_learned_sink_share_equals_the_models_own() -> None:
    model = tm.build("gpt_oss")
    ids = tm.token_ids(96, 2)
    with torch.no_grad():  # eager GPT-OSS returns the probabilities with the sink column dropped
        attentions = model(ids, output_attentions=True).attentions
    result = calibrate(model, CharDecode(), ids, progress=False)
    for layer, probs in enumerate(attentions):  # [B, H, L, L]
        want = (1 - probs.sum(-1)).mean(dim=(0, 2))  # [H]
        got = result.stats[f"learned_sink_mass/{layer}"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert want.max() > 0.05  # the sinks matter in this model
    # attention mass on real keys is the model's: each query's keys take 1 - sink share
    lead = result.stats["attn_mass/0"][:, 0]  # [H] share of position 0
    want0 = attentions[0][..., 0].sum(-1).div(96).mean(0)  # [B, H, Lq] -> [H], all queries see it
    torch.testing.assert_close(lead, want0, atol=1e-5, rtol=1e-4)


def test_large_learned_sinks_show_in_report_and_table() -> None:
    model = _sinks(tm.build("gpt_oss"), 8.0)
    result = calibrate(model, CharDecode(), tm.token_ids(96, 2), progress=False)
    rows = build_report(result)["sinks"]["learned"]
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(r["mean"] > 0.5 and len(r["mass"]) == 4 for r in rows), rows
    table = format_table(result)
    assert table.count("learned    sink logits") == 2
    small = calibrate(_sinks(tm.build("gpt_oss"), -8.0), CharDecode(), tm.token_ids(96, 2), progress=False)
    assert all(r["mean"] < 0.01 for r in build_report(small)["sinks"]["learned"])
    plain = calibrate(tm.build("llama"), CharDecode(), tm.token_ids(96, 2), progress=False)
    assert build_report(plain)["sinks"]["learned"] == [] and "learned" not in format_table(plain).split("\n", 3)[3]


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gpt_oss")
    tm.save(_sinks(tm.build("gpt_oss"), 6.0), root / "model")
    (root / "calib.txt").write_text("The tower is 324 metres tall, about the same height as an 81-storey "
                                    "building, and the tallest structure in Paris. " * 30)
    return root / "model", root / "calib.txt"


def test_inspect_cli_reports_learned_sinks(gpt_oss_dir, tmp_path: Path, capsys) -> None:
    model, calib = gpt_oss_dir
    capsys.readouterr()
    rc = main(["inspect", "--model", str(model), "--calib", str(calib), "--calib-samples", "2",
               "--calib-seq-len", "96", "--out", str(tmp_path / "report"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.count("learned    sink logits") == 2
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["layer"] for r in report["sinks"]["learned"]] == [0, 1]
    assert min(r["mean"] for r in report["sinks"]["learned"]) > 0.5
    assert (tmp_path / "report" / "learned_sinks.png").read_bytes()[:4] == b"\x89PNG"


def test_quantize_cli_on_gpt_oss(gpt_oss_dir, tmp_path: Path, capsys) -> None:
    model, calib = gpt_oss_dir
    recipe = tmp_path / "w4.yaml"
    recipe.write_text("name: w4-g32\nversion: 1\nweights:\n  algorithm: gptq\n  group_size: 32\n"
                      "  outlier_channels: 2\n  expert_min_tokens: 16\ncalibration:\n  samples: 4\n"
                      "  seq_len: 64\n")
    capsys.readouterr()
    rc = main(["quantize", "--model", str(model), "--recipe", str(recipe), "--calib", str(calib),
               "--out", str(tmp_path / "out"), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "quantized MoE experts modules" in captured.out and "fell back to RTN" in captured.out
    report = json.loads((tmp_path / "out" / "quantsink_report.json").read_text())
    assert [sum(r["routed_tokens"]) for r in report["experts"]] == [4 * 64 * 2] * 2
    assert report["decoder_float_fraction"] <= 0.05
