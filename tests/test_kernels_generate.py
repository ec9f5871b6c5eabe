"""``generate`` through SinkQuantCache with the Triton decode kernel (interpreter on CPU)."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from quantsink.hf.forward import cache_kwargs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernel runs in the interpreter


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=64, vocab_size=128,
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval().to(DEVICE)


def generate(model, backend: str, prompt: torch.Tensor, new_tokens: int):
    from quantsink.kv.cache import SinkQuantCache
    from quantsink.kv.config import KVConfig

    kv = KVConfig(key_bits=4, value_bits=2, key_group_size=16, value_group_size=32, num_sinks=2, window=16)
    cache = SinkQuantCache.from_recipe(model, kv, backend=backend)
    with torch.no_grad():
        out = model.generate(prompt, **cache_kwargs(model, cache), max_new_tokens=new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.scores), cache


def test_generate_triton_matches_torch(monkeypatch):
    pytest.importorskip("quantsink.kv.cache")
    import quantsink.kernels.decode_attention as kern

    calls = []
    real = kern.sink_decode_attention
    monkeypatch.setattr(kern, "sink_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_llama()
    prompt = torch.randint(1, 128, (2, 45), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    seq_t, scores_t, _ = generate(model, "torch", prompt, 12)
    assert calls == []
    seq_k, scores_k, cache = generate(model, "triton", prompt, 12)
    assert len(calls) == 2 * 11  # every decode step of both layers went through the kernel
    # a first group shortened to 14 by the 2 sinks at prefill, one full group flushed while decoding
    assert cache.layers[0].body_k.num_tokens == 30 and cache.layers[0].body_k.offset == 2
    assert torch.isfinite(scores_k).all()
    assert (scores_k - scores_t).abs().max().item() < 1e-3
    assert torch.equal(seq_k, seq_t)
