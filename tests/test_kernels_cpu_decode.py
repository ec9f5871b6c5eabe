"""The C++ CPU decode kernel against ``decode_attention_ref`` (fp32 arithmetic on both sides)."""
from __future__ import annotations

import pytest
import torch

from quantsink.kv.attention import decode_attention, decode_attention_ref
from test_kernels_decode_attention import CASES, EXTRA_CASES, make_case, sink_logits

cpu_decode = pytest.importorskip("quantsink.kernels.cpu_decode")
pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="the C++ CPU kernel does not build here")
ATOL = {torch.float16: 2e-3, torch.float32: 1e-4}  # as the Triton kernel's
DECODE_CASES = {k: v for k, v in CASES.items() if v.get("Lq", 1) == 1}


def check(args, **extras) -> float:
    args = [x.cpu() if isinstance(x, torch.Tensor) else x for x in args]
    out = cpu_decode.sink_decode_cpu(*args, **extras)
    ref = decode_attention_ref(*(x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                                 for x in args), **extras)
    assert out.dtype == args[0].dtype and torch.isfinite(out).all()
    err = (out.float() - ref).abs().max().item()
    assert err <= ATOL[args[0].dtype], err
    return err


@pytest.mark.parametrize("name", sorted(DECODE_CASES))
def test_matches_reference(name):
    check(make_case(**{**DECODE_CASES[name], "dtype": torch.float32}))


@pytest.mark.parametrize("name", sorted(k for k, v in EXTRA_CASES.items() if v[0].get("Lq", 1) == 1))
def test_attention_variants_match_reference(name):
    kwargs, extras, _ = EXTRA_CASES[name]
    args = make_case(**{**kwargs, "dtype": torch.float32})
    check(args, **extras(args))


def test_fp16_inputs_and_fully_masked_rows():
    args = list(make_case(key_mask=True))  # fp16 queries and regions
    args[8][1] = False
    check(args, sink_logits=sink_logits(args))
    out = cpu_decode.sink_decode_cpu(*args)
    assert out[1].abs().max() == 0


def test_auto_backend_uses_it_for_decode_steps(monkeypatch):
    calls = []
    real = cpu_decode.sink_decode_cpu
    monkeypatch.setattr(cpu_decode, "sink_decode_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv("QUANTSINK_BACKEND", raising=False)
    args = make_case(T=64, W=5, dtype=torch.float32)
    torch.testing.assert_close(decode_attention(*args), decode_attention_ref(*args), atol=1e-4, rtol=0)
    assert calls == [1]
    decode_attention(*make_case(Lq=3, g=2, dtype=torch.float32))  # several queries: the reference
    assert calls == [1]
