"""Model-level wiring of the weight kernels: int8 embedding / lm_head, kernels chosen at load.

- :func:`quantize_embeddings` (``quantize``): replaces the token embedding and/or the lm_head
  by int8-row modules (:mod:`quantsink.weights.embedding`) following ``weights.embedding_bits``
  / ``weights.lm_head_bits``; a tied pair becomes one set of rows.
- :func:`make_shells` (``from_pretrained``, before the weights load): the same modules, empty,
  so that the loader fills them from the checkpoint.
- :func:`prepare_model` (after loading, and at the end of ``quantize``): every packed module
  picks its kernel now, once, on the device it lives on, instead of on the first forward, and
  int4pack siblings that read the same input are merged (:mod:`quantsink.weights.fusion`).

A replaced tied pair is removed from transformers' tied-weights mapping
(``model.all_tied_weights_keys``): the tie is kept by the modules themselves.
"""
from __future__ import annotations

import ctypes
import functools
import sys
from collections import Counter
from typing import Any

import torch
from torch import nn

from quantsink.errors import check
from quantsink.weights.embedding import Int8Embedding, Int8LMHead


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _is_tied(model: nn.Module, emb: nn.Module, head: nn.Module | None) -> bool:
    """True when the lm_head shares the embedding's weight (in memory, or by the config)."""
    if head is None:
        return False
    w, hw = getattr(emb, "weight", None), getattr(head, "weight", None)
    if w is not None and hw is not None and w.device.type != "meta":
        return hw is w
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(cfg, "tie_word_embeddings", False))


def _untie(model: nn.Module, *prefixes: str) -> None:
    """Drop transformers' tied-weight entries that name the replaced modules."""
    keys = getattr(model, "all_tied_weights_keys", None)
    if not keys:
        return
    for target, source in list(keys.items()):
        if any(k.startswith(p + ".") for k in (target, source) for p in prefixes):
            keys.pop(target)


def embed_scale(emb: nn.Module) -> float | None:
    """The constant an embedding multiplies its rows by (1.0 for ``nn.Embedding``; Gemma 2 / 3's
    scaled word embeddings: ``sqrt(hidden)``), or None when int8 rows cannot replace it. A scaled
    subclass is checked on a few rows: its output must be the row times the scale, exactly."""
    if not isinstance(emb, nn.Embedding) or emb.max_norm is not None:
        return None
    if type(emb) is nn.Embedding:
        return 1.0
    scale = getattr(emb, "scalar_embed_scale", None)
    if not isinstance(scale, (int, float)):
        return None
    w = emb.weight
    if w.device.type != "meta":
        ids = torch.arange(min(8, w.shape[0]), device=w.device)
        with torch.no_grad():
            if not torch.equal(emb(ids), w[ids] * torch.tensor(float(scale), dtype=w.dtype, device=w.device)):
                return None
    return float(scale)


def _plan(model: nn.Module, emb_bits: int | None, head_bits: int | None) -> tuple:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = _is_tied(model, emb, head)
    check(not tied or emb_bits == head_bits,
          f"weights.embedding_bits={emb_bits} and weights.lm_head_bits={head_bits} differ, but this "
          "model ties embed_tokens and lm_head (one tensor); allowed: equal values")
    check(emb_bits is None or embed_scale(emb) is not None,
          f"weights.embedding_bits needs an nn.Embedding without max_norm (plain, or scaled by a constant "
          f"as Gemma's), got {type(emb).__name__}; allowed: embedding_bits: null for this model")
    check(head_bits is None or (type(head) is nn.Linear and head.bias is None),
          f"weights.lm_head_bits needs a bias-free nn.Linear lm_head, got {type(head).__name__}; "
          "allowed: lm_head_bits: null for this model")
    return emb, head, tied


def check_embeddings(model: nn.Module, embedding_bits: int | None, lm_head_bits: int | None) -> None:
    """One line, before any work, when the embedding / lm_head cannot take the recipe's int8 rows."""
    if embedding_bits is not None or lm_head_bits is not None:
        _plan(model, embedding_bits, lm_head_bits)


def _install(model: nn.Module, emb: Any, head: Any, new_emb: Any, new_head: Any) -> None:
    names = []
    if new_emb is not None:
        names.append(_name(model, emb))
        model.set_input_embeddings(new_emb)
    if new_head is not None:
        names.append(_name(model, head))
        model.set_output_embeddings(new_head)
    _untie(model, *names)


def quantize_embeddings(model: nn.Module, embedding_bits: int | None,
                        lm_head_bits: int | None) -> list[dict]:
    """Quantize the embedding / lm_head in place; returns report rows (name, shape, bytes)."""
    if embedding_bits is None and lm_head_bits is None:
        return []
    emb, head, tied = _plan(model, embedding_bits, lm_head_bits)
    emb_name, head_name = _name(model, emb), head is not None and _name(model, head)
    new_emb = Int8Embedding.from_float(emb, embed_scale(emb)) if embedding_bits else None
    new_head = Int8LMHead.from_float(head, new_emb if tied else None) if lm_head_bits else None
    _install(model, emb, head, new_emb, new_head)
    rows = []
    for name, mod in ((emb_name, new_emb), (head_name, new_head)):
        if mod is None:
            continue
        src = mod.rows if isinstance(mod, Int8LMHead) else mod
        own = src.weight_int8.numel() + 2 * src.weight_scale.numel()
        rows.append({"name": name, "bits": 8, "shape": list(src.weight_int8.shape), "tied": tied,
                     "packed_bytes": own if src is mod else 0})  # a tied head stores nothing
    return rows


def make_shells(model: nn.Module, weights: dict | None) -> None:
    """Empty int8 embedding / lm_head modules for a checkpoint's ``weights`` section (meta device)."""
    emb_bits, head_bits = (weights or {}).get("embedding_bits"), (weights or {}).get("lm_head_bits")
    if emb_bits is None and head_bits is None:
        return
    emb, head, tied = _plan(model, emb_bits, head_bits)
    new_emb = None
    if emb_bits:
        w = emb.weight
        new_emb = Int8Embedding(w.shape[0], w.shape[1], emb.padding_idx, w.dtype, w.device, embed_scale(emb))
    new_head = None
    if head_bits:
        new_head = Int8LMHead(head.in_features, head.out_features, new_emb if tied else None,
                              head.weight.device)
    _install(model, emb, head, new_emb, new_head)


@functools.cache
def _glibc(name: str) -> Any:
    """glibc's function ``name`` (None elsewhere: not Linux, or musl and other libcs)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def fixed_mmap_threshold(nbytes: int = 2**20) -> None:
    """Serve every allocation of ``nbytes`` or more by its own mapping (glibc; a no-op elsewhere).

    glibc raises its mmap threshold (up to 32 MB) after big frees, and then serves tensors
    below it from the heap, where the streamed quantizer's per-layer weights fragmented it:
    peak RSS grew with the number of layers. A fixed threshold returns every freed weight."""
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def release_freed_memory() -> None:
    """Hand the heap memory freed by the conversion back to the OS (glibc; a no-op elsewhere).

    The conversion allocates and frees a few MB per layer; glibc then raises its mmap
    threshold and keeps later frees in the heap, which kept 0-150 MB of freed buffers
    resident after loading SmolLM2 (measured). ``malloc_trim`` returns them.
    """
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


def prepare_model(model: nn.Module, fuse: bool = True) -> dict[str, int]:
    """Choose every QuantLinear's kernel now, on its device, and (``fuse``) merge int4pack
    siblings that share an input (:mod:`quantsink.weights.fusion`); returns
    ``{kernel: count}`` (``"fused"``: how many of the int4pack layers were merged)."""
    from quantsink.weights.fusion import fuse_siblings
    from quantsink.weights.linear import QuantLinear

    counts: Counter = Counter()
    layers = [m for m in model.modules()
              if isinstance(m, QuantLinear) and m.weight_packed.device.type != "meta"]
    if fuse:  # fused members get their plans here, without converting them one by one
        counts["fused"] = fuse_siblings(model, after_each=release_freed_memory)
    for i, mod in enumerate(layers):
        if not fuse and mod._plan is not None and mod._plan.fused:
            mod._plan = None  # undo an earlier fusion
        counts[mod.prepare()] += 1
        if i % 16 == 15:
            release_freed_memory()
    release_freed_memory()
    if not counts.get("fused"):
        counts.pop("fused", None)
    return dict(counts)
