"""The sink cache on every supported attention variant (tiny random-init models of 11 families).

Sliding-window layers (Mistral, Gemma 2/3, GPT-OSS), learned sink logits (GPT-OSS), attention
softcapping (Gemma 2), per-layer-type RoPE (Gemma 3), interleaved RoPE (Cohere), q/k norms
(Qwen3, OLMo 2) and multipliers (Granite): the cache must give what the model's own cache gives.

GPT-OSS runs with every expert active (``num_experts_per_tok = num_local_experts``): with top-2
routing, the 8-bit cache's tiny error flips a near-tied routing decision now and then, a jump of
the model itself (about 1 logit), not of the cache.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import tiny_models as tm
from quantsink.errors import QuantsinkError
from quantsink.kv.cache import SinkQuantCache
from quantsink.kv.config import KVConfig

LENGTH, PREFILL, NEW = 96, 32, 16
KV8 = KVConfig(key_bits=8, value_bits=8, key_group_size=16, value_group_size=16, num_sinks=2, window=16)
NOTHING = KVConfig(key_bits=8, value_bits=8, key_group_size=16, value_group_size=16, num_sinks=2, window=256,
                   dense_dtype="model")  # fp32 sinks and window: the plumbing alone
KV4 = KVConfig(key_bits=4, value_bits=4, key_group_size=16, value_group_size=16, num_sinks=2, window=16)


def build(name: str, **kw):
    return tm.build(name, **({"num_experts_per_tok": 4} if name == "gpt_oss" else {}), **kw)


@pytest.fixture(scope="module", params=tm.ARCHS + ("gpt2",))
def arch(request):
    model = build(request.param)
    ids = tm.token_ids(LENGTH)
    with torch.no_grad():
        ref = model(ids).logits  # the model's own (dynamic) cache, never attached
    return request.param, model, ids, ref


def run(model, ids, cfg, chunks):
    """Logits of ``ids`` fed in chunks of the given sizes through a fresh sink cache."""
    cache = SinkQuantCache.from_recipe(model, cfg)
    outs, start = [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(model(ids[:, start:start + n], **tm.cache_kwargs(model, cache)).logits)
            start += n
    return torch.cat(outs, 1), cache


def test_8bit_cache_matches_the_models_own(arch):
    name, model, ids, ref = arch
    forced, cache = run(model, ids, KV8, [LENGTH])
    stepped, _ = run(model, ids, KV8, [PREFILL] + [1] * (LENGTH - PREFILL))
    assert all(layer.body_k is not None and layer.body_k.num_tokens for layer in cache.layers), name
    assert (forced - ref).abs().max().item() <= 0.05, name
    assert (stepped - ref).abs().max().item() <= 0.05, name


def test_nothing_quantized_is_the_model(arch):
    name, model, ids, ref = arch
    forced, cache = run(model, ids, NOTHING, [LENGTH])
    stepped, _ = run(model, ids, NOTHING, [PREFILL] + [1] * (LENGTH - PREFILL))
    assert cache.layers[0].body_k is None
    assert (forced - ref).abs().max().item() <= 1e-3, name
    assert (stepped - ref).abs().max().item() <= 1e-3, name


def test_generate_gives_the_models_greedy_tokens(arch):
    name, model, ids, _ = arch
    plain = copy.deepcopy(model)
    prompt = ids[:, :64]
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = plain.generate(prompt, **kw)
        got = model.generate(prompt, **tm.cache_kwargs(model, SinkQuantCache.from_recipe(model, KV8)), **kw)
    assert torch.equal(got, want), name


def test_teacher_forced_equals_token_by_token_4bit(arch):
    """In float64, so that no rounding of the fp16 storage can tell the chunkings apart."""
    name, _, ids, _ = arch
    model = build(name)
    if name == "gpt_oss":
        model.set_experts_implementation("eager")  # grouped_mm has no float64
    model = model.double()
    forced, _ = run(model, ids, KV4, [LENGTH])
    stepped, _ = run(model, ids, KV4, [1] * LENGTH)
    chunked, _ = run(model, ids, KV4, [37, 37, 22])
    torch.testing.assert_close(stepped, forced, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(chunked, forced, atol=1e-9, rtol=1e-9)


def test_dynamic_cache_after_attaching_is_exactly_the_model(arch):
    name, model, ids, _ = arch
    fresh = build(name)
    SinkQuantCache.from_recipe(model, KV8)  # switches attention, installs the hooks
    with torch.no_grad():
        want = fresh(ids, **tm.cache_kwargs(fresh, DynamicCache())).logits
        got = model(ids, **tm.cache_kwargs(model, DynamicCache())).logits
        want_plain, got_plain = fresh(ids).logits, model(ids).logits
    assert torch.equal(got, want) and torch.equal(got_plain, want_plain), name


def test_sliding_layers_hold_at_most_their_window():
    model = tm.build("gemma3")
    ids = tm.token_ids(300)
    _, cache = run(model, ids, KV4, [300])
    for layer in cache.layers:
        body = layer.body_k.num_tokens if layer.body_k is not None else 0
        if layer.is_sliding:
            assert body <= tm.WINDOW + KV4.key_group_size and not layer.sink_pos
        else:
            assert layer.sink_pos == [0, 1] and body >= 300 - 2 - 32
        assert layer.get_seq_length() == 300


def test_learned_sinks_change_the_result():
    """GPT-OSS with its learned sinks zeroed gives other logits: the sinks are really applied."""
    model, zeroed = build("gpt_oss"), build("gpt_oss", sink_logits=0.0)
    ids = tm.token_ids(LENGTH)
    a, _ = run(model, ids, KV8, [LENGTH])
    b, _ = run(zeroed, ids, KV8, [LENGTH])
    assert (a - b).abs().max() > 0.1


@pytest.mark.parametrize("name", [tm.REFUSED_FALCON])
def test_models_outside_the_attention_interface_are_refused(name):
    model = tm.build(name)
    with pytest.raises(QuantsinkError) as err:
        SinkQuantCache.from_recipe(model, KV8)
    assert tm.REFUSED[name] in str(err.value) and "\n" not in str(err.value)
