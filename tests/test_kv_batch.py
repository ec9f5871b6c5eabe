"""The batch invariant: each row of a left-padded batch is generated as that prompt alone.

Six prompts of 5 to 600 tokens, left-padded into one batch, greedy, through the shipped
``kv-int4-sink`` recipe: with the default chunked prefill (the first chunks of the short rows
are all padding) and without chunking, every row gets the tokens, the sinks and the cached
keys it gets alone. Float64 models, so that no batched-matmul rounding moves a 4-bit code.
"""
from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from quantsink.hf.generate import PREFILL_CHUNK
from quantsink.kv.cache import SinkQuantCache
from quantsink.kv.rows import RowsLayer

LENGTHS = (5, 37, 130, 260, 420, 600)
NEW = 6
# one with sliding windows (mistral), one with learned sinks and sliding layers (gpt_oss)
ARCHS = ("llama", "qwen2", "mistral", "gpt_oss", "gemma3")


def _prompts(lengths=LENGTHS) -> list[torch.Tensor]:
    return [tm.token_ids(n, seed=10 + i)[0] for i, n in enumerate(lengths)]


def _left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.numel() for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.numel():], mask[b, width - p.numel():] = p, 1
    return ids, mask


def _generate(model, ids, mask, chunk, **kw):
    cache = SinkQuantCache.from_recipe(model, "kv-int4-sink")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             pad_token_id=0, prefill_chunk_size=chunk, **tm.cache_kwargs(model, cache), **kw)
    return out[:, ids.shape[1]:], cache


@pytest.fixture(scope="module", params=ARCHS)
def model(request, one_thread):
    m = tm.build(request.param, **({"num_experts_per_tok": 4} if request.param == "gpt_oss" else {}))
    if request.param == "gpt_oss":
        m.set_experts_implementation("eager")
    return m.double()


@pytest.fixture(scope="module")
def alone(model):
    """Per prompt: (generated tokens, cache) of that prompt on its own, unchunked."""
    return [_generate(model, p[None], torch.ones(1, p.numel(), dtype=torch.long), None) for p in _prompts()]


@pytest.mark.parametrize("chunk", [PREFILL_CHUNK, 64, None], ids=["default-chunks", "chunks-64", "no-chunks"])
def test_each_row_generates_what_it_generates_alone(model, alone, chunk):
    ids, mask = _left_pad(_prompts())
    got, cache = _generate(model, ids, mask, chunk)
    for b, (want, own) in enumerate(alone):
        assert torch.equal(got[b], want[0]), f"row {b} ({LENGTHS[b]} tokens)"
    for layer, own_layers in zip(cache.layers, zip(*(c.layers for _, c in alone))):
        assert isinstance(layer, RowsLayer)
        for b, (row, own) in enumerate(zip(layer.rows, own_layers)):
            # the row's sinks are its own first real tokens, with the keys it caches alone
            assert row.sink_pos == own.sink_pos, (b, row.sink_pos)
            assert row.is_sliding or row.sink_pos == [0, 1, 2, 3]  # sliding layers drop sinks out of reach
            assert row.seen == own.seen == LENGTHS[b] + NEW - 1
            torch.testing.assert_close(row.sink_k, own.sink_k, atol=1e-3, rtol=0)
            if own.body_k is not None:  # the same flush schedule: the same groups, the same codes
                assert torch.equal(row.body_k.codes, own.body_k.codes), b


def test_equal_length_rows_keep_one_shared_layout(model):
    prompts = [tm.token_ids(150, seed=s)[0] for s in (3, 4)]
    ids = torch.stack(prompts)
    got, cache = _generate(model, ids, torch.ones_like(ids), 64)
    assert not any(isinstance(layer, RowsLayer) for layer in cache.layers)
    for b, p in enumerate(prompts):
        want, _ = _generate(model, p[None], torch.ones(1, p.numel(), dtype=torch.long), 64)
        assert torch.equal(got[b], want[0])


def test_beam_search_rows_equal_each_prompt_alone(one_thread):
    model = tm.build("llama").double()
    prompts = _prompts((9, 140, 300))
    ids, mask = _left_pad(prompts)
    got, _ = _generate(model, ids, mask, 64, num_beams=2)
    for b, p in enumerate(prompts):
        want, _ = _generate(model, p[None], torch.ones(1, p.numel(), dtype=torch.long), 64, num_beams=2)
        assert torch.equal(got[b], want[0]), b


@pytest.mark.model
def test_smollm2_rows_equal_each_prompt_alone(smollm, test_path):
    model, tok = smollm
    text = test_path.read_text(encoding="utf-8")
    ids_all = tok(text[:20000], return_tensors="pt").input_ids[0]
    prompts = [ids_all[i * 700:i * 700 + n] for i, n in enumerate(LENGTHS)]
    ids, mask = _left_pad(prompts)
    got, _ = _generate(model, ids, mask, PREFILL_CHUNK)
    for b, p in enumerate(prompts):
        want, _ = _generate(model, p[None], torch.ones(1, p.numel(), dtype=torch.long), None)
        assert torch.equal(got[b], want[0]), f"row {b} ({LENGTHS[b]} tokens)"


def _stream_config(max_tokens: int):
    from quantsink.kv.config import KVConfig

    return KVConfig(key_bits=4, value_bits=4, key_group_size=16, value_group_size=16, num_sinks=1, window=16,
                    content_sinks=True, content_sink_occurrences=2, max_cache_tokens=max_tokens)


def test_streaming_capacity_counts_content_sinks_before_generation():
    from quantsink.calibration.sinkmap import SinkMap
    from quantsink.errors import QuantsinkError

    sinks = SinkMap(positional=[0], content_token_ids=[5, 6, 7])  # up to 1 + 3 * 2 sinks per row
    with pytest.raises(QuantsinkError) as err:
        SinkQuantCache.from_recipe(tm.build("llama"), _stream_config(1 + 6 + 16 + 16 - 1), sink_map=sinks)
    assert "content sinks" in str(err.value) and "\n" not in str(err.value)


def test_streaming_with_content_sinks_and_mixed_padding(one_thread):
    """Rows of 20 / 150 / 300 tokens with content sinks at a cache of exactly the checked size:
    each row streams as it does alone and never holds more than the limit."""
    from quantsink.calibration.sinkmap import SinkMap

    model, limit = tm.build("llama").double(), 1 + 6 + 16 + 16
    sinks = SinkMap(positional=[0], content_token_ids=[5, 6, 7])
    prompts = _prompts((20, 150, 300))
    ids, mask = _left_pad(prompts)

    def run(ids, mask):
        cache = SinkQuantCache.from_recipe(model, _stream_config(limit), sink_map=sinks)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0, prefill_chunk_size=64, **tm.cache_kwargs(model, cache))
        return out[:, ids.shape[1]:], cache

    got, cache = run(ids, mask)
    held = [row.num_held() for layer in cache.layers for row in layer.rows]
    assert max(held) <= limit and min(len(row.sink_pos) for row in cache.layers[0].rows) > 1  # content sinks
    for b, p in enumerate(prompts):
        want, _ = run(p[None], torch.ones(1, p.numel(), dtype=torch.long))
        assert torch.equal(got[b], want[0]), b


def test_a_4d_attention_mask_is_refused_not_dropped():
    from quantsink.errors import QuantsinkError

    model = tm.build("llama")
    ids = tm.token_ids(12)
    mask = torch.tril(torch.ones(12, 12, dtype=torch.bool))[None, None]  # [1, 1, L, S], e.g. a tree mask
    cache = SinkQuantCache.from_recipe(model, "kv-int4-sink")
    with pytest.raises(QuantsinkError) as err, torch.no_grad():
        model(ids, attention_mask=mask, **tm.cache_kwargs(model, cache))
    assert "4-D" in str(err.value) and "\n" not in str(err.value)
