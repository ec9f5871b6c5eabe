"""The C++ CPU decode kernel against ``decode_attention_ref`` (fp32 arithmetic on both sides)."""
from __future__ import annotations

import pytest
import torch

from quantsink.kv.attention import decode_attention, decode_attention_ref
from test_kernels_decode_attention import CASES, EXTRA_CASES, make_case, sink_logits

from cpu_levels import LEVELS
from quantsink.kernels import cpu_decode

# no module-wide skip: each test runs per ISA level (a level the host cannot run skips by name)
ATOL = {torch.float16: 2e-3, torch.float32: 1e-4}  # as the Triton kernel's
DECODE_CASES = {k: v for k, v in CASES.items() if v.get("Lq", 1) == 1}


def check(args, isa=None, **extras) -> float:
    args = [x.cpu() if isinstance(x, torch.Tensor) else x for x in args]
    out = cpu_decode.sink_decode_cpu(*args, isa=isa, **extras)
    ref = decode_attention_ref(*(x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                                 for x in args), **extras)
    assert out.dtype == args[0].dtype and torch.isfinite(out).all()
    err = (out.float() - ref).abs().max().item()
    assert err <= ATOL[args[0].dtype], err
    return err


@pytest.mark.parametrize("name", sorted(DECODE_CASES))
@pytest.mark.parametrize("isa", LEVELS)
def test_matches_reference(name, isa):
    check(make_case(**{**DECODE_CASES[name], "dtype": torch.float32}), isa)


@pytest.mark.parametrize("name", sorted(k for k, v in EXTRA_CASES.items() if v[0].get("Lq", 1) == 1))
@pytest.mark.parametrize("isa", LEVELS)
def test_attention_variants_match_reference(name, isa):
    kwargs, extras, _ = EXTRA_CASES[name]
    args = make_case(**{**kwargs, "dtype": torch.float32})
    check(args, isa, **extras(args))


@pytest.mark.parametrize("isa", LEVELS)
def test_fp16_inputs_and_fully_masked_rows(isa):
    args = list(make_case(key_mask=True))  # fp16 queries and regions
    args[8][1] = False
    check(args, isa, sink_logits=sink_logits(args))
    out = cpu_decode.sink_decode_cpu(*args, isa=isa)
    assert out[1].abs().max() == 0


@pytest.mark.skipif(not cpu_decode.available(), reason="the C++ CPU extension does not build here")
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
