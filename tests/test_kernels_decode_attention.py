"""The Triton decode-attention kernel against ``decode_attention_ref`` (interpreter on CPU)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from quantsink.errors import QuantsinkError
from quantsink.kv import attention
from quantsink.kv.attention import decode_attention, decode_attention_ref
from quantsink.kv.primitives import quantize_keys, quantize_values

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp16: the bound; bf16: a torch emulation of the kernel's roundings gave <= 7.8e-3
ATOL = {torch.float16: 2e-3, torch.float32: 1e-4, torch.bfloat16: 2e-2}


def make_case(B=2, Hkv=2, g=4, Lq=1, D=64, S0=3, T=128, W=37, kbits=4, vbits=4, gk=64, gv=64,
              dtype=torch.float16, key_mask=False, q_sink=False, seed=0, off=0, vsym=False, nout=0):
    """Random inputs in which the sinks take about half of the attention mass."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    scale = D ** -0.5
    q = randn(B, Hkv * g, Lq, D)
    sink_k, sink_v = randn(B, Hkv, S0, D), randn(B, Hkv, S0, D)
    if S0:  # sink key 0 along the mean query of its KV head: logit ~ log(#keys)
        qm = q.reshape(B, Hkv, g * Lq, D).mean(2)  # [B, Hkv, D]
        target = torch.log(torch.tensor(float(S0 + T + W))) + 0.5
        sink_k[:, :, 0] = qm * (target / (qm.pow(2).sum(-1, keepdim=True) * scale))
    body_k = quantize_keys(randn(B, Hkv, T, D) + 0.5, kbits, gk, offset=off, outliers=nout) if T else None
    body_v = quantize_values(randn(B, Hkv, T, D), vbits, gv, symmetric=vsym) if T else None
    win_k, win_v = randn(B, Hkv, W, D), randn(B, Hkv, W, D)
    S = S0 + T + W
    mask = None
    if key_mask:  # row 1 is left-padded by a third of the keys
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[1, : S // 3] = False
    qs = randn(B, Hkv * g, Lq, D) if q_sink else None
    cast = [x.to(DEVICE, dtype) for x in (q, sink_k, sink_v)]
    rest = [x.to(DEVICE, dtype) for x in (win_k, win_v)]
    for blk in (body_k, body_v):
        if blk is not None:
            blk.codes, blk.scale = blk.codes.to(DEVICE), blk.scale.to(DEVICE)
            blk.zero = None if blk.zero is None else blk.zero.to(DEVICE)
            if blk.outlier_idx is not None:
                blk.outlier_idx, blk.outlier_delta = blk.outlier_idx.to(DEVICE), blk.outlier_delta.to(DEVICE)
    return (*cast, body_k, body_v, *rest, scale,
            None if mask is None else mask.to(DEVICE), None if qs is None else qs.to(DEVICE, dtype))


def sink_mass(args) -> float:
    """Mean attention mass on the sink region (checks the test premise)."""
    q, sink_k, sink_v, body_k, body_v, win_k, win_v, scale = args[:8]
    marker = torch.zeros_like(sink_v).float()
    marker[..., 0] = 1  # value 1 on channel 0 for sinks, 0 everywhere else
    zero_body = None
    if body_v is not None:
        zeros = torch.zeros(body_v.codes.shape[:3] + (q.shape[-1],), device=q.device)
        zero_body = quantize_values(zeros, body_v.bits, body_v.group_size)
    probe = decode_attention_ref(q.float(), sink_k.float(), marker, body_k, zero_body, win_k.float(),
                                 torch.zeros_like(win_v).float(), scale, *args[8:])
    return probe[..., 0].mean().item()


def run_kernel(args, num_splits=None, **extras):
    from quantsink.kernels.decode_attention import _attention

    return _attention(*args, num_splits=num_splits, **extras)


def exact_reference(args, **extras) -> torch.Tensor:
    """The reference in fp32 on the same (fp16-valued) inputs: no final rounding to fp16."""
    return decode_attention_ref(*(x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                                  for x in args), **extras)


def assert_close(args, num_splits=None, **extras) -> float:
    out = run_kernel(args, num_splits, **extras)
    ref = exact_reference(args, **extras)
    assert out.shape == ref.shape and out.dtype == args[0].dtype
    assert torch.isfinite(out).all(), "the kernel produced NaN/inf"
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= ATOL[args[0].dtype], f"max abs error {err}"
    return err


CASES = {
    "unaligned_int4_g32": dict(S0=3, T=64, W=37, gk=32, gv=32),
    "int2_d128": dict(D=128, S0=4, T=128, W=50, kbits=2, vbits=2),
    "int8": dict(kbits=8, vbits=8),
    "int2_d64": dict(kbits=2, vbits=2, gk=32, gv=32, T=96),  # parts of 16 channels
    "k4_v2_mixed": dict(kbits=4, vbits=2, W=20),
    "gqa1": dict(g=1),
    "gqa3": dict(g=3, Hkv=1),
    "gqa8": dict(g=8, Hkv=1, D=128),
    "sinks_only": dict(T=0, W=0),
    "empty_body": dict(T=0, W=70),
    "empty_window": dict(W=0),
    "no_sinks": dict(S0=0),
    "key_group_128": dict(T=256, gk=128, D=128, W=10),
    "head_dim_256": dict(D=256, B=1, Hkv=1, W=17),
    "fp32": dict(dtype=torch.float32),
    "key_mask": dict(key_mask=True),
    "q_sink": dict(q_sink=True),
    "causal_lq3": dict(Lq=3, g=2, key_mask=True),
    "key_offset_4": dict(S0=4, T=124, off=4, W=9),  # the sinks' share of the first key group
    "key_offset_int2_g128": dict(S0=4, T=252, off=4, gk=128, kbits=2, vbits=2, D=128, key_mask=True),
    "key_offset_whole_tile": dict(S0=70, T=58, off=70, gk=128, W=3),  # first body tile all phantom
    "symmetric_values_int2": dict(S0=4, T=124, off=4, kbits=2, vbits=2, vsym=True, W=30),
    "symmetric_values_int4_g32": dict(T=96, gk=32, gv=32, vsym=True, key_mask=True),
    "key_outliers_int2_g128": dict(S0=4, T=252, off=4, gk=128, nout=2, kbits=2, vbits=2, vsym=True, W=20),
    "key_outliers_int4_d128": dict(D=128, T=128, nout=1, key_mask=True),
    "causal_lq20_row_blocks": dict(Lq=20, g=4, B=1, Hkv=1, T=64, W=40),  # 80 rows: 2 programs in M
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name):
    assert_close(make_case(**CASES[name]))


@pytest.mark.parametrize("splits", [2, 5])
def test_split_k_reduce(splits):
    assert_close(make_case(T=192, W=37, key_mask=True, q_sink=True, seed=splits), num_splits=splits)
    assert_close(make_case(S0=4, T=188, off=4, W=37, seed=splits), num_splits=splits)
    assert_close(make_case(S0=4, T=252, off=4, gk=128, nout=2, kbits=2, seed=splits), num_splits=splits)


@pytest.mark.parametrize("name", ["unaligned_int4_g32", "int2_d128", "gqa8"])
def test_sinks_take_about_half_the_mass(name):
    mass = sink_mass(make_case(**CASES[name]))
    assert 0.3 < mass < 0.75, mass


def test_fully_masked_sequence_gives_zeros():
    args = list(make_case(key_mask=True))
    args[8][1] = False
    out = run_kernel(args, num_splits=3)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    assert (out.float() - decode_attention_ref(*args).float()).abs().max() <= ATOL[torch.float16]


def test_unsupported_key_group_falls_back_to_reference():
    args = make_case(T=48, gk=24, W=5)
    assert torch.equal(run_kernel(args), decode_attention_ref(*args))


def test_bad_key_mask_raises():
    args = list(make_case(key_mask=True))
    args[8] = args[8][:, :-1]
    with pytest.raises(QuantsinkError, match="key_mask must be"):
        run_kernel(args)


@pytest.mark.parametrize("D", [16, 80, 96, 112])
def test_head_dims_outside_the_kernel_take_the_reference(D):
    """Phi-3's 96 (and 80, 112, the tiny models' 16): the reference runs, and the path says why."""
    args = make_case(D=D, gk=16, gv=16, T=64, W=9, key_mask=True)
    assert torch.equal(run_kernel(args), decode_attention_ref(*args))
    assert torch.equal(decode_attention(*args, backend="triton"), decode_attention_ref(*args))
    path = attention.decode_path(args[0], args[3], args[4], backend="triton")
    assert path == f"torch (triton: head_dim {D} is not one of the kernel's (64, 128, 256))"
    q, *_, body_k, body_v = make_case(T=64, W=5)[:5]
    assert attention.decode_path(q, body_k, body_v, backend="triton") == "triton"


@pytest.mark.parametrize("head_dim, want", [(96, "torch (triton: head_dim 96 is not one of"), (64, "triton")])
def test_cache_layers_name_their_decode_path(monkeypatch, head_dim, want):
    """Through the model: each layer's ``kernel`` is the path its last decode step took."""
    import tiny_models as tm

    from quantsink.kv.cache import SinkQuantCache
    from quantsink.kv.config import KVConfig

    monkeypatch.setenv("QUANTSINK_BACKEND", "triton")
    model = tm.build("phi3", hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=head_dim)
    cfg = KVConfig(key_bits=4, value_bits=4, key_group_size=16, value_group_size=16, num_sinks=2, window=16)
    cache = SinkQuantCache.from_recipe(model, cfg)
    ids = tm.token_ids(60)
    with torch.no_grad():
        model(ids[:, :59], **tm.cache_kwargs(model, cache))
        assert all(layer.kernel is None for layer in cache.layers)  # no decode step yet
        model(ids[:, 59:], **tm.cache_kwargs(model, cache))
    assert all(layer.body_k is not None and layer.kernel.startswith(want) for layer in cache.layers)


def test_dispatch(monkeypatch):
    import quantsink.kernels.decode_attention as kern

    calls = []
    real = kern.sink_decode_attention
    monkeypatch.setattr(kern, "sink_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = make_case(T=64, W=5)
    decode_attention(*args, backend="torch")
    assert calls == []
    monkeypatch.setenv("QUANTSINK_BACKEND", "triton")
    out = decode_attention(*args)
    assert calls == [1] and (out.float() - decode_attention_ref(*args).float()).abs().max() <= 2e-3
    assert attention.resolve_backend("torch", torch.device("cpu")) == "torch"
    monkeypatch.delenv("QUANTSINK_BACKEND")
    assert attention.resolve_backend("auto", torch.device("cpu")) in ("cpu", "torch")  # C++ kernel if it builds
    with pytest.raises(QuantsinkError, match="allowed"):
        attention.resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (no bf16 in the interpreter)")
def test_bf16_on_gpu():
    assert_close(make_case(dtype=torch.bfloat16, D=128))


def test_interpreter_is_active_without_gpu():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"


def test_key_outliers_matter_in_the_comparison():
    """The outlier case is sensitive: dropping the corrections moves the output well past ATOL."""
    args = list(make_case(**CASES["key_outliers_int2_g128"]))
    ref = exact_reference(args)
    body_k = args[3]
    body_k.outlier_delta = torch.zeros_like(body_k.outlier_delta)
    assert (exact_reference(args) - ref).abs().max() > 10 * ATOL[torch.float16]


def sink_logits(args, scale: float = 2.0, seed: int = 3) -> torch.Tensor:
    """Learned per-head sink logits of the size of the real keys' logits (they matter)."""
    q = args[0]
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(q.shape[1], generator=gen) * scale + 2.0).to(q.device)


EXTRA_CASES = {  # (make_case kwargs, extras builder, splits)
    "learned_sinks": (dict(), lambda a: dict(sink_logits=sink_logits(a)), None),
    "learned_sinks_split_k": (dict(T=192, key_mask=True), lambda a: dict(sink_logits=sink_logits(a)), 3),
    "learned_sinks_lq3": (dict(Lq=3, g=2), lambda a: dict(sink_logits=sink_logits(a)), None),
    "sliding_window_into_body": (dict(T=128, W=37), lambda a: dict(sliding_window=61), None),
    "sliding_window_in_window": (dict(T=64, W=37), lambda a: dict(sliding_window=20), 2),
    "sliding_window_causal_lq4": (dict(Lq=4, g=2, T=64, W=30), lambda a: dict(sliding_window=45), None),
    "softcap": (dict(), lambda a: dict(softcap=3.0), None),
    "softcap_int2_split_k": (dict(kbits=2, vbits=2, T=192), lambda a: dict(softcap=2.0), 4),
    "gpt_oss_like": (dict(S0=2, T=126, off=2, W=16, key_mask=True),
                     lambda a: dict(sink_logits=sink_logits(a), sliding_window=50), 2),
    "fp32_all_extras": (dict(dtype=torch.float32), lambda a: dict(sink_logits=sink_logits(a),
                                                                  sliding_window=70, softcap=4.0), None),
}


@pytest.mark.parametrize("name", sorted(EXTRA_CASES))
def test_attention_variants_match_reference(name):
    kwargs, extras, splits = EXTRA_CASES[name]
    args = make_case(**kwargs)
    assert_close(args, splits, **extras(args))


@pytest.mark.parametrize("extras", [
    lambda a: dict(sink_logits=sink_logits(a)), lambda a: dict(sliding_window=61), lambda a: dict(softcap=2.0)])
def test_attention_variants_matter_in_the_comparison(extras):
    """Each variant moves the output well past the tolerance: the tests above are not vacuous."""
    args = make_case(T=128, W=37)
    assert (exact_reference(args, **extras(args)) - exact_reference(args)).abs().max() > 10 * ATOL[torch.float16]


def test_sliding_window_reference_by_positions():
    """The index-space window rule equals masking by position (body and window keys consecutive)."""
    args = make_case(T=64, W=37, S0=3)
    S = 3 + 64 + 37
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[:, 3:S - 25] = False  # keys more than 25 positions back (sinks kept)
    torch.testing.assert_close(exact_reference(args, sliding_window=25),
                               exact_reference(list(args[:8]) + [mask.to(DEVICE)]))
