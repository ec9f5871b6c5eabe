"""Perplexity over non-overlapping windows (the evaluation protocol of the README).

Protocol Q: the first ``max_tokens`` tokens of a corpus, cut into non-overlapping windows
of ``ctx`` tokens; every window is scored on all its tokens but the first; the result is
``exp(total NLL / scored tokens)``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from tqdm import tqdm


@torch.no_grad()
def window_nll(model: Any, window: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of one window ``[L]`` and the number of scored tokens."""
    ids = window[None].to(model.device)
    logits = model(ids, use_cache=False).logits[0, :-1].float()  # [L-1, V]
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
    return nll.item(), ids.shape[1] - 1


def perplexity(model: Any, tokens: torch.Tensor, ctx: int = 2048, progress: bool = True,
               desc: str = "ppl") -> dict:
    """Perplexity of ``model`` on 1-D ``tokens`` in windows of ``ctx``; returns ``{"ppl", "tokens"}``.

    A trailing partial window shorter than ``ctx`` is dropped.
    """
    n_windows = tokens.numel() // ctx
    if n_windows == 0:
        raise ValueError(f"need at least {ctx} tokens for one window, got {tokens.numel()}")
    total, count = 0.0, 0
    for i in tqdm(range(n_windows), desc=desc, disable=not progress, leave=False):
        nll, n = window_nll(model, tokens[i * ctx:(i + 1) * ctx])
        total, count = total + nll, count + n
    return {"ppl": math.exp(total / count), "tokens": n_windows * ctx}
