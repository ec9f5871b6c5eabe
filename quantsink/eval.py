"""Perplexity over non-overlapping windows (the evaluation protocol of the README).

Protocol Q: the first ``max_tokens`` tokens of a corpus, cut into non-overlapping windows
of ``ctx`` tokens; every window is scored on all its tokens but the first; the result is
``exp(total NLL / scored tokens)``.

KV-faithful mode (``kv=KVConfig``): every window runs through a fresh
:class:`~quantsink.kv.cache.SinkQuantCache` in one forward pass. The cache's chunk
attention gives query ``t`` exactly the cache that token-by-token generation would hold at
time ``t`` (quantized body, fp16 sinks, fp16 window with the same flush schedule), so the
teacher-forced perplexity is the perplexity of generation. ``kv_avg_bits`` is the mean over
windows of the bits held per K/V element at the end of the window, everything counted.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from tqdm import tqdm

from quantsink.errors import check
from quantsink.hf.forward import cache_kwargs


@torch.no_grad()
def window_nll(model: Any, window: torch.Tensor, cache: Any = None) -> tuple[float, int]:
    """Summed next-token NLL of one window ``[L]`` and the number of scored tokens."""
    ids = window[None].to(model.device)
    if cache is None:
        logits = model(ids, use_cache=False).logits[0, :-1].float()  # [L-1, V]
    else:
        logits = model(ids, **cache_kwargs(model, cache), use_cache=True).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
    return nll.item(), ids.shape[1] - 1


def perplexity(model: Any, tokens: torch.Tensor, ctx: int = 2048, progress: bool = True,
               desc: str = "ppl", kv: Any = None, sink_map: Any = None) -> dict:
    """Perplexity of ``model`` on 1-D ``tokens`` in windows of ``ctx``.

    Returns ``{"ppl", "tokens", "kv_avg_bits"}``. ``kv``: a KVConfig (or anything
    :meth:`SinkQuantCache.from_recipe` accepts) for the KV-faithful mode; without it the
    model's own fp cache is used and ``kv_avg_bits`` is the bit width of the model dtype.
    A trailing partial window shorter than ``ctx`` is dropped.
    """
    check(ctx >= 2, f"the evaluation window must be >= 2 tokens, got {ctx}")
    n_windows = tokens.numel() // ctx
    check(n_windows > 0, f"need at least {ctx} tokens for one evaluation window, got {tokens.numel()}; "
                         "allowed: a longer text or a shorter window")
    make_cache = _cache_factory(model, kv, sink_map)
    total, count, bits = 0.0, 0, []
    for i in tqdm(range(n_windows), desc=desc, disable=not progress, leave=False):
        cache = make_cache() if make_cache else None
        nll, n = window_nll(model, tokens[i * ctx:(i + 1) * ctx], cache)
        total, count = total + nll, count + n
        bits.append(cache.avg_bits() if cache is not None else 8.0 * model.dtype.itemsize)
    check(math.isfinite(total), f"the model's loss is not finite ({total}) on these {n_windows * ctx} tokens: "
                                "its weights or activations hold NaN/Inf; allowed: a model with finite outputs")
    return {"ppl": math.exp(total / count), "tokens": n_windows * ctx,
            "kv_avg_bits": sum(bits) / len(bits)}


def _cache_factory(model: Any, kv: Any, sink_map: Any):
    if kv is None:
        return None
    from quantsink.kv.cache import SinkQuantCache, resolve_kv_config

    config = resolve_kv_config(kv)
    return lambda: SinkQuantCache.from_recipe(model, config, sink_map=sink_map, backend="torch")
