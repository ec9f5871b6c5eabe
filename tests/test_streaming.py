"""StreamingLLM mode: eviction of the oldest body groups, sinks kept, chunked == token by token."""
from __future__ import annotations

import torch

from quantsink.kv.config import KVConfig
from quantsink.kv.layer import SinkQuantLayer
from test_kv_cache import logits_by_steps, tiny_llama

CFG = KVConfig(key_bits=8, value_bits=8, key_group_size=16, value_group_size=16, window=16,
               num_sinks=4, max_cache_tokens=80)


def test_eviction_keeps_sinks_and_total_length() -> None:
    layer = SinkQuantLayer(CFG)
    layer.set_sinks([0, 1, 2, 3])
    k = torch.randn(1, 2, 300, 8)
    for t in range(300):
        layer.update(k[:, :, t:t + 1], k[:, :, t:t + 1])
        layer.finish()
        assert layer.num_held() <= 80
    assert layer.get_seq_length() == 300 and layer.sink_pos == [0, 1, 2, 3]
    assert torch.equal(layer.sink_k.float(), k[:, :, :4].half().float())
    pos = layer.positions()
    assert pos[4:].tolist() == list(range(300 - pos[4:].numel(), 300))  # true positions, contiguous


def test_streaming_chunks_equal_token_by_token() -> None:
    """Chunked streaming (with evictions inside chunks, rotated sink queries) == decoding."""
    model = tiny_llama(3)
    ids = torch.randint(0, 96, (1, 260), generator=torch.Generator().manual_seed(4))
    steps = logits_by_steps(model, ids, CFG, chunk=1)
    chunks = logits_by_steps(model, ids, CFG, chunk=50)
    torch.testing.assert_close(chunks, steps, atol=1e-4, rtol=1e-4)


def test_sink_queries_are_rotated_back() -> None:
    """Without the q_sink rotation the stream would differ (the rotation is really used)."""
    model = tiny_llama(3)
    ids = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(4))
    with_sinks = logits_by_steps(model, ids, CFG, chunk=200)
    from quantsink.kv import cache as cache_mod

    orig = cache_mod.SinkQuantCache._sink_queries
    cache_mod.SinkQuantCache._sink_queries = lambda self, idx, layer, q: None
    try:
        unrotated = logits_by_steps(model, ids, CFG, chunk=200)
    finally:
        cache_mod.SinkQuantCache._sink_queries = orig
    assert (with_sinks[0, :80] - unrotated[0, :80]).abs().max() < 1e-6  # nothing evicted yet
    assert (with_sinks[0, 120:] - unrotated[0, 120:]).abs().max() > 1e-4
