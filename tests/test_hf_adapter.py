"""The transformers adapter: forward arguments, RoPE shift, generate's default cache, cache misuse."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import tiny_models as tm
from quantsink.errors import QuantsinkError
from quantsink.hf import forward
from quantsink.hf.arch import decoder_layers
from quantsink.hf.rope import RopeShift
from quantsink.kv.cache import SinkQuantCache
from quantsink.kv.config import KVConfig
from quantsink.weights.backend import use_backend

KV = KVConfig(key_bits=8, value_bits=8, key_group_size=16, value_group_size=16, num_sinks=2, window=16)
STREAM = KVConfig(key_bits=8, value_bits=8, key_group_size=16, value_group_size=16, num_sinks=4, window=16,
                  max_cache_tokens=64)


def test_call_arguments_find_the_cache_under_either_name():
    model = tm.build("llama")
    marker = object()
    for kwargs in ({"cache": marker}, {"past_key_values": marker}):
        named = forward.call_arguments(model, (torch.ones(1, 2, dtype=torch.long),), kwargs)
        assert forward.cache_argument(named) is marker and named["input_ids"].shape == (1, 2)
    named = forward.call_arguments(model.model, (None, None, None, marker), {})  # positional
    assert forward.cache_argument(named) is marker


ROPE_ARCHS = [a for a in tm.ARCHS if a != "gpt2"]


@pytest.mark.parametrize("name", ROPE_ARCHS)
def test_rope_shift_uses_the_models_own_rotary(name):
    """R(-s) R(p) q == R(p - s) q with the layer's own tables (Gemma 3: per layer type; Cohere:
    interleaved); RopeShift checks this itself on construction, here on the model's real queries."""
    model = tm.build(name)
    for spec in range(len(decoder_layers(model)[1])):
        shift = RopeShift(model, spec)
        q0 = torch.randn(1, 2, 4, shift.rotate(torch.zeros(1, 1, 1, 16), torch.zeros(1)).shape[-1])
        pos, s = torch.tensor([7, 50, 90, 200]), torch.tensor([1, 16, 64, 150])
        torch.testing.assert_close(shift(shift.rotate(q0, pos), s), shift.rotate(q0, pos - s),
                                   atol=1e-5, rtol=1e-5)


def test_llama_convention_shift_would_be_wrong_on_cohere():
    """Cohere rotates interleaved pairs: the halves convention is off there (the old bug)."""
    model = tm.build("cohere")
    shift = RopeShift(model, 0)
    q0, pos, s = torch.randn(1, 1, 1, 16), torch.tensor([40]), torch.tensor([30])
    llama = RopeShift(tm.build("llama"), 0)
    assert (llama(shift.rotate(q0, pos), s) - shift.rotate(q0, pos - s)).abs().max() > 0.1


@pytest.mark.parametrize("name", ["gemma3", "cohere", "gpt_oss"])
def test_streaming_chunks_equal_token_by_token(name):
    model = tm.build(name, num_experts_per_tok=4) if name == "gpt_oss" else tm.build(name)
    if name == "gpt_oss":
        model.set_experts_implementation("eager")
    model = model.double()
    ids = tm.token_ids(160)
    outs = []
    for chunk in (160, 1, 45):
        cache = SinkQuantCache.from_recipe(model, STREAM)
        with torch.no_grad():
            outs.append(torch.cat([model(ids[:, a:a + chunk], **tm.cache_kwargs(model, cache)).logits
                                   for a in range(0, 160, chunk)], 1))
        full = [layer for layer in cache.layers if not layer.is_sliding]
        assert all(layer.evicted > 0 and layer.num_held() <= 64 for layer in full)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-9, rtol=1e-9)


def test_streaming_needs_rope():
    with pytest.raises(QuantsinkError, match="rotary"):
        SinkQuantCache.from_recipe(tm.build("gpt2"), STREAM)


def quantized_tiny():
    import quantsink

    model = tm.build("llama")
    recipe = {"name": "t", "weights": {"algorithm": "rtn", "group_size": 32, "outlier_channels": 0},
              "kv_cache": {"key_bits": 8, "value_bits": 8, "key_group_size": 16, "value_group_size": 16,
                           "num_sinks": 2, "window": 16}}
    return quantsink.quantize(model, recipe, progress=False)


def test_generate_builds_the_sink_cache_by_default_and_survives_deepcopy(monkeypatch):
    import quantsink.weights.hf_quantizer as hq

    model = quantized_tiny()
    built = []
    real = hq.build_sink_cache
    monkeypatch.setattr(hq, "build_sink_cache", lambda m: built.append(m) or real(m))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    prompt = tm.token_ids(40)
    with torch.no_grad():
        a = model.generate(prompt, **kw)
        twin = copy.deepcopy(model)
        b = twin.generate(prompt, **kw)
        c = model.generate(prompt, **kw, **tm.cache_kwargs(model, SinkQuantCache.from_recipe(model, KV)))
        model.generate(prompt, **kw, use_cache=False)
    assert [m is x for m, x in zip(built, (model, twin))] == [True, True] and len(built) == 2
    assert torch.equal(a, b) and torch.equal(a, c)
    assert type(model).__name__ == "LlamaForCausalLM" and type(twin) is type(model)
    assert type(pickle.loads(pickle.dumps(model))) is type(model)


def test_default_cache_prefills_in_chunks_with_the_same_result():
    from quantsink.hf.generate import PREFILL_CHUNK

    model = quantized_tiny().double()  # float64: no chunk-size rounding flips a cached 8-bit code
    lengths: list[int] = []
    hook = model.model.register_forward_pre_hook(lambda m, a, k: lengths.append(k["input_ids"].shape[1]),
                                                 with_kwargs=True)
    prompt = tm.token_ids(PREFILL_CHUNK + 44)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad(), use_backend("reference"):  # the bf16 weight kernels round per row count
        chunked = model.generate(prompt, **kw)
        assert lengths[:2] == [PREFILL_CHUNK, 44], lengths[:3]
        lengths.clear()
        whole = model.generate(prompt, **kw, prefill_chunk_size=None)  # the caller turns it off
        assert lengths[0] == PREFILL_CHUNK + 44
        small = model.generate(prompt, **kw, prefill_chunk_size=16)
    hook.remove()
    assert torch.equal(chunked.sequences, whole.sequences) and torch.equal(small.sequences, whole.sequences)
    for a, b, c in zip(chunked.logits, whole.logits, small.logits):
        assert (a - b).abs().max() <= 1e-9 and (c - b).abs().max() <= 1e-9


def test_generate_accepts_both_cache_keywords():
    model = tm.build("llama")
    prompt = tm.token_ids(30)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(prompt, **kw)
        for name in forward.CACHE_NAMES:
            if name == "cache" and forward.cache_keyword(model) != "cache":
                continue  # transformers < 5.24 has no `cache=` in generate
            got = model.generate(prompt, **kw, **{name: SinkQuantCache.from_recipe(model, KV)})
            assert torch.equal(got, want), name


def test_beam_search_reorders_the_cache():
    model = tm.build("llama")
    nothing = KVConfig(key_bits=8, value_bits=8, key_group_size=16, value_group_size=16, window=256,
                       dense_dtype="model")
    prompt = tm.token_ids(30)
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = copy.deepcopy(model).generate(prompt, **kw)
        got = model.generate(prompt, **kw, **tm.cache_kwargs(model, SinkQuantCache.from_recipe(model, nothing)))
    assert torch.equal(got, want)


@pytest.mark.parametrize("action, match", [
    (lambda c, m: c.crop(10), "cannot be cropped"),
    (lambda c, m: c.offload(0), "offloading"),
    (lambda c, m: m.generate(tm.token_ids(20), max_new_tokens=3, assistant_model=copy.deepcopy(m),
                             **tm.cache_kwargs(m, c)), "assist|crop"),
])
def test_unsupported_cache_operations_are_one_line(action, match):
    model = tm.build("llama")
    cache = SinkQuantCache.from_recipe(model, KV)
    with torch.no_grad():
        model(tm.token_ids(20), **tm.cache_kwargs(model, cache))
    with pytest.raises(QuantsinkError, match=match) as err:
        action(cache, model)
    assert "\n" not in str(err.value)


def test_cache_misuse_is_refused():
    a, b = tm.build("llama"), tm.build("llama", seed=1)
    cache = SinkQuantCache.from_recipe(a, KV)
    with torch.no_grad():
        a(tm.token_ids(20), **tm.cache_kwargs(a, cache))
        with pytest.raises(QuantsinkError, match="not attached to this model"):
            b(tm.token_ids(1), **tm.cache_kwargs(b, cache))
        with pytest.raises(QuantsinkError, match="batch 1"):
            a(tm.token_ids(1, batch=2), **tm.cache_kwargs(a, cache))
        with pytest.raises(QuantsinkError, match="another model"):
            cache.attach(b)
    with pytest.raises(QuantsinkError, match="has 2 layers but GemmaForCausalLM|has 6"):
        SinkQuantCache(KV, 2).attach(tm.build("gemma3"))
