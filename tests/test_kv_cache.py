"""SinkQuantCache: faithful chunked attention, GQA, memory, padding and bad input."""
from __future__ import annotations

import pytest
import torch

from quantsink.errors import QuantsinkError
from quantsink.kv.attention import decode_attention_ref
from quantsink.kv.cache import SinkQuantCache
from quantsink.kv.config import KVConfig
from quantsink.kv.layer import SinkQuantLayer
from quantsink.kv.prefill import chunk_attention_ref
from quantsink.hf.forward import cache_kwargs


def tiny_llama(seed: int = 0):
    """A 2-layer random Llama with GQA (4 query heads, 2 KV heads, head_dim 16), float64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).double().eval()


def logits_by_steps(model, ids: torch.Tensor, cfg: KVConfig, chunk: int) -> torch.Tensor:
    cache = SinkQuantCache.from_recipe(model, cfg)
    with torch.no_grad():
        outs = [model(ids[:, a:a + chunk], **cache_kwargs(model, cache)).logits for a in range(0, ids.shape[1], chunk)]
    assert cache.get_seq_length() == ids.shape[1]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("cfg", [
    KVConfig(key_bits=4, value_bits=4, key_group_size=16, value_group_size=16, window=32),
    KVConfig(key_bits=2, value_bits=2, key_group_size=16, value_group_size=8, window=0, rotate=True,
             value_symmetric=True),  # 4 sinks shorten the first key group (offset 4)
    KVConfig(key_bits=2, value_bits=2, key_group_size=16, value_group_size=16, window=16, key_outliers=2,
             value_symmetric=True, rotate=True),  # the kv-int2-sink layout, small groups
])
def test_teacher_forced_equals_token_by_token(cfg: KVConfig) -> None:
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 300), generator=torch.Generator().manual_seed(1))
    full = logits_by_steps(model, ids, cfg, chunk=300)
    steps = logits_by_steps(model, ids, cfg, chunk=1)
    chunks = logits_by_steps(model, ids, cfg, chunk=37)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunks, full, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # and the quantization really changed something
        model.set_attn_implementation("sdpa")
        assert (model(ids).logits - full).abs().max() > 1e-3


def test_chunk_attention_matches_decode_reference() -> None:
    """A single-query chunk over the three regions equals decode_attention_ref (GQA 3:1)."""
    cfg = KVConfig(key_bits=4, value_bits=4, key_group_size=8, value_group_size=8, window=8, num_sinks=2)
    layer = SinkQuantLayer(cfg)
    layer.set_sinks([0, 1])
    k, v = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    layer.update(k[:, :, :39], v[:, :, :39])
    layer.finish()
    layer.update(k[:, :, 39:], v[:, :, 39:])
    q = torch.randn(2, 6, 1, 16)
    got = chunk_attention_ref(layer, q, 0.25)
    ref = decode_attention_ref(q, layer.sink_k, layer.sink_v, layer.body_k, layer.body_v,
                               layer.win_k, layer.win_v, 0.25)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # 38 non-sink tokens: a first group shortened to 6 by the 2 sinks, 3 full groups, window 8
    assert layer.sink_k.shape[2] == 2 and layer.body_k.num_tokens == 30 and layer.win_k.shape[2] == 8
    assert layer.body_k.offset == 2 and layer.body_k.scale.shape[2] == 4


def test_each_token_quantized_once() -> None:
    """Flushing appends whole groups; earlier body codes never change."""
    cfg = KVConfig(key_bits=2, value_bits=2, key_group_size=8, value_group_size=8, window=8, num_sinks=1)
    layer = SinkQuantLayer(cfg)
    layer.set_sinks([0])
    k = torch.randn(1, 1, 64, 8)
    layer.update(k[:, :, :30], k[:, :, :30])
    before = layer.body_k.codes.clone()
    for t in range(30, 64):
        layer.update(k[:, :, t:t + 1], k[:, :, t:t + 1])
    assert torch.equal(layer.body_k.codes[:, :, :before.shape[2]], before)
    assert layer.num_held() == 64 and 8 <= layer.win_k.shape[2] < 16


@pytest.mark.parametrize("recipe,limit", [("kv-int4-sink", 0.30), ("kv-int2-sink", 0.19)])
def test_memory_8192_tokens(recipe: str, limit: float) -> None:
    from quantsink.kv.cache import resolve_kv_config

    cfg = resolve_kv_config(recipe)
    layer = SinkQuantLayer(cfg)
    layer.set_sinks(list(range(cfg.num_sinks)))
    k = torch.randn(1, 3, 8192, 64)
    layer.update(k, k)
    fp16 = 2 * k.numel() * 2  # keys + values of a fp16 DynamicCache layer
    assert layer.nbytes() <= limit * fp16, layer.nbytes() / fp16


@pytest.mark.parametrize("kwargs,needle", [
    ({"key_bits": 3}, "key_bits=3"), ({"value_group_size": 0}, "value_group_size"),
    ({"window": 16, "key_group_size": 32}, "window=16"),
    ({"num_sinks": 200, "window": 64, "max_cache_tokens": 128}, "max_cache_tokens=128"),
    ({"content_sinks": True, "content_sink_occurrences": 0}, "content_sink_occurrences"),
    ({"key_outliers": 64, "key_group_size": 128}, "key_outliers=64"),
])
def test_bad_config_one_line(kwargs: dict, needle: str) -> None:
    with pytest.raises(QuantsinkError) as err:
        KVConfig(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_sink_map_larger_than_cache() -> None:
    class Map:
        positional = list(range(300))

    with pytest.raises(QuantsinkError, match="do not fit"):
        SinkQuantCache(KVConfig(window=64, max_cache_tokens=256), 2, sink_map=Map())


def test_unattached_cache_is_a_clear_error() -> None:
    model = tiny_llama()
    with pytest.raises(QuantsinkError, match="attach"):
        model(torch.tensor([[1, 2, 3]]), **cache_kwargs(model, SinkQuantCache(KVConfig(), 2)))


def test_left_padded_batch_matches_single_rows() -> None:
    """Each row of a left-padded batch gets the logits it would get alone (bits=8)."""
    model = tiny_llama()
    cfg = KVConfig(key_bits=8, value_bits=8, key_group_size=8, value_group_size=16, window=8)
    a = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    b = a[:, 10:]
    batch = torch.cat([a, torch.cat([torch.zeros(1, 10, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :10] = 0
    with torch.no_grad():
        cache = SinkQuantCache.from_recipe(model, cfg)
        out = model.generate(batch, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=12,
                             do_sample=False)
        alone = model.generate(b, **cache_kwargs(model, SinkQuantCache.from_recipe(model, cfg)),
                               max_new_tokens=12, do_sample=False)
    assert torch.equal(out[1, 10:], alone[0])


def test_sink_map_positions_non_contiguous() -> None:
    """A SinkMap-like object with positions [0, 5] keeps exactly those tokens in fp16."""
    class Map:
        positional = [0, 5]

    model = tiny_llama()
    cfg = KVConfig(key_bits=4, value_bits=4, key_group_size=16, value_group_size=16, window=16)
    ids = torch.randint(0, 96, (1, 120), generator=torch.Generator().manual_seed(5))
    results = []
    for chunk in (120, 1):
        cache = SinkQuantCache(cfg, 2, sink_map=Map()).attach(model)
        with torch.no_grad():
            results.append(torch.cat([model(ids[:, a:a + chunk], **cache_kwargs(model, cache)).logits
                                      for a in range(0, 120, chunk)], 1))
        layer = cache.layers[0]
        assert layer.sink_pos == [0, 5] and layer.positions()[:3].tolist() == [0, 5, 1]
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("occurrences,expected", [(1, [0, 30]), (2, [0, 30, 50])])
def test_content_sinks_keep_first_occurrences(occurrences: int, expected: list[int]) -> None:
    """Calibrated content-sink ids: their first occurrences are fp16 sinks, in any chunking."""
    from quantsink.calibration.sinkmap import SinkMap

    model = tiny_llama()
    cfg = KVConfig(key_bits=2, value_bits=2, key_group_size=16, value_group_size=16, window=0,
                   content_sinks=True, content_sink_occurrences=occurrences)
    ids = torch.randint(10, 96, (1, 120), generator=torch.Generator().manual_seed(7))
    ids[0, [30, 50, 90]] = 7
    sink_map = SinkMap(positional=[0], content_token_ids=[7])
    results = []
    for chunk in (120, 1, 37):
        cache = SinkQuantCache(cfg, 2, sink_map=sink_map).attach(model)
        with torch.no_grad():
            results.append(torch.cat([model(ids[:, a:a + chunk], **cache_kwargs(model, cache)).logits
                                      for a in range(0, 120, chunk)], 1))
        assert [layer.sink_pos for layer in cache.layers] == [expected, expected]
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[2], results[0], atol=1e-4, rtol=1e-4)


def test_content_sinks_need_a_sink_map() -> None:
    with pytest.raises(QuantsinkError, match="content_sinks=true needs a calibrated sink map"):
        SinkQuantCache(KVConfig(content_sinks=True), 2)


@pytest.mark.parametrize("group,dim,want", [(64, 96, 48), (64, 64, 64), (64, 16, 16), (12, 16, 8), (32, 96, 32),
                                            (128, 80, 80), (64, 80, 40)])
def test_value_group_is_the_largest_divisor_of_head_dim(group: int, dim: int, want: int) -> None:
    cfg = KVConfig(value_group_size=group, rotate=True)
    assert cfg.value_group_for(dim) == want
    notes = cfg.notes(dim)
    assert any("value_group_size" in n for n in notes) == (want not in (group, dim))
    assert any("block-diagonal" in n for n in notes) == (dim & (dim - 1) != 0)
