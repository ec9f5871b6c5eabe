"""On the real model: the bf16 CPU kernels move perplexity by far less than 0.3 %."""
from __future__ import annotations

import copy

import pytest
from quant_layers import input_absmax

import quantsink
from quantsink.weights import backend, cpu_int4
from quantsink.weights.backend import use_backend

pytestmark = [pytest.mark.model,
              pytest.mark.skipif(cpu_int4.kernel_problem() is not None, reason="no int4pack kernel")]

RECIPE = {"name": "test-w4-e8", "weights": {"algorithm": "rtn", "group_size": 64,
                                            "outlier_channels": 16, "clip_search": False,
                                            "embedding_bits": 8, "lm_head_bits": 8}}
CTX, WINDOWS = 512, 1  # Protocol-style (non-overlapping windows of wiki.test), short


@pytest.fixture(scope="module")
def quantized(smollm, calib_path, test_path):
    from quantsink.data import calibration_windows, eval_tokens

    model, tok = smollm
    model = copy.deepcopy(model)
    cal = input_absmax(model, calibration_windows(tok, calib_path, 1, 256, seed=0))
    quantsink.quantize(model, RECIPE, calibration=cal, progress=False)  # outliers from cal
    return model, eval_tokens(tok, test_path, CTX * WINDOWS)


def _ppl(model, ids) -> float:
    from quantsink.eval import perplexity

    return perplexity(model, ids, CTX, progress=False)["ppl"]


def test_kernel_paths_keep_perplexity(quantized, monkeypatch) -> None:
    model, ids = quantized
    with use_backend("reference"):  # exact float32, tile by tile
        ref = _ppl(model, ids)
    tiled = _ppl(model, ids)  # 512 rows per call: bf16 tiles + bf16 GEMM, int8 lm_head tiles
    monkeypatch.setattr(backend, "INT4PACK_MAX_ROWS", CTX)  # read on every call
    kernel = _ppl(model, ids)  # every row through the int4pack kernel
    assert 10 < ref < 100
    for name, ppl in (("tiled bf16", tiled), ("int4pack", kernel)):
        assert abs(ppl / ref - 1) <= 0.003, (name, ppl, ref)
    assert kernel != ref  # the paths really differ (bf16), the test can fail
