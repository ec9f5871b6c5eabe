"""What a :class:`~quantsink.kv.cache.SinkQuantCache` knows about the token rows it serves.

- the sink positions (the first ``num_sinks``, or a calibrated sink map's positional sinks;
  with left padding, the union over rows of ``pad_b + s``);
- the 2-D padding mask of the running forward (True = real token), indexed by position;
- content sinks: the first ``content_sink_occurrences`` occurrences per row of every
  content-sink token id of the sink map become sink positions as they arrive.
"""
from __future__ import annotations

from typing import Any

import torch

from quantsink.errors import check
from quantsink.kv.config import KVConfig


class TokenState:
    """Sink positions, padding and content-sink bookkeeping of one cache."""

    def __init__(self, config: KVConfig, sink_map: Any = None) -> None:
        positional = list(range(config.num_sinks)) if sink_map is None else list(sink_map.positional)
        check(all(p >= 0 for p in positional), f"sink positions must be >= 0, got {positional}")
        if config.max_cache_tokens is not None:
            need = len(positional) + config.window + config.key_group_size
            check(config.max_cache_tokens >= need,
                  f"{len(positional)} sinks + window {config.window} + one key group do not fit in "
                  f"max_cache_tokens={config.max_cache_tokens}; allowed: >= {need}")
        content = list(sink_map.content_token_ids) if sink_map is not None and config.content_sinks else []
        check(not config.content_sinks or content,
              "kv_cache.content_sinks=true needs a calibrated sink map with content-sink token ids "
              "(from `quantsink inspect`); allowed: content_sinks: false without one")
        self.config, self.positional = config, sorted(positional)
        self.content_ids = torch.tensor(content, dtype=torch.long)
        self.reset()

    def reset(self) -> None:
        self.padding: torch.Tensor | None = None  # bool [B, seen + L] of the running forward
        self.content_seen: dict[tuple[int, int], int] = {}  # (row, token id) -> occurrences kept
        self.new_sinks: list[int] = []  # content-sink positions of the running forward
        self._rows: int | None = None

    def rows(self) -> int:
        """Batch rows seen so far (1 before the first forward)."""
        return self._rows or 1

    def begin(self, input_ids: torch.Tensor | None, attention_mask: Any, seen: int, has_embeds: bool) -> None:
        """Record the padding and the content sinks of a forward over positions ``seen..``."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 \
                and not bool(attention_mask.all()):
            self.padding = attention_mask.bool().cpu()
        else:
            self.padding = None
        check(self.content_ids.numel() == 0 or input_ids is not None or not has_embeds,
              "kv_cache.content_sinks needs input_ids to find the content sinks; allowed: input_ids "
              "instead of inputs_embeds, or content_sinks: false")
        if input_ids is not None and input_ids.dim() == 2:
            self._rows = input_ids.shape[0]
        self._observe(input_ids, seen)

    def _observe(self, input_ids: torch.Tensor | None, seen: int) -> None:
        self.new_sinks = []
        if self.content_ids.numel() == 0 or input_ids is None or input_ids.dim() != 2:
            return
        ids = input_ids.cpu()
        hits = torch.isin(ids, self.content_ids)
        if self.padding is not None:
            hits &= self.padding[:, seen:seen + ids.shape[1]]
        new = set()
        for b, j in hits.nonzero().tolist():
            key = (b, int(ids[b, j]))
            if self.content_seen.get(key, 0) < self.config.content_sink_occurrences:
                self.content_seen[key] = self.content_seen.get(key, 0) + 1
                new.add(seen + j)
        self.new_sinks = sorted(new)

    def sink_positions(self) -> list[int]:
        """The positional sinks, as positions of the (possibly left-padded) batch."""
        if self.padding is None:
            return self.positional
        pads = (self.padding.long().cumsum(-1) == 0).sum(-1).unique().tolist()  # leading pads per row
        return sorted({p + s for p in pads for s in self.positional})

    def select_rows(self, rows: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``rows[i]`` (beam search reorders, repeats)."""
        if self.padding is not None:
            self.padding = self.padding[rows]
        old = self.content_seen
        self.content_seen = {(i, t): n for i, r in enumerate(rows.tolist())
                             for (b, t), n in old.items() if b == r}
        self._rows = rows.numel()
