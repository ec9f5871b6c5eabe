"""What a :class:`~quantsink.kv.cache.SinkQuantCache` knows about the token rows it serves.

- the positional sinks (the first ``num_sinks``, or a calibrated sink map's positional sinks),
  counted from each row's first real token;
- which tokens of the running forward are real (the 2-D padding mask, True = real token);
- content sinks: the first ``content_sink_occurrences`` occurrences per row of every
  content-sink token id of the sink map become sink positions of that row as they arrive;
- whether the rows must be stored apart (``ragged``): a left-padded batch, or a batch of
  several rows with content sinks, gives each row its own layout (:mod:`quantsink.kv.rows`),
  so every row is cached exactly as it would be alone.

Positions handed to the layers are row-relative: the ``i``-th real token of a row is at ``i``.
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
        content = list(sink_map.content_token_ids) if sink_map is not None and config.content_sinks else []
        check(not config.content_sinks or content,
              "kv_cache.content_sinks=true needs a calibrated sink map with content-sink token ids "
              "(from `quantsink inspect`); allowed: content_sinks: false without one")
        self.config, self.positional = config, sorted(positional)
        self.content_ids = torch.tensor(content, dtype=torch.long)
        self._check_capacity()
        self.reset()

    def _check_capacity(self) -> None:
        """StreamingLLM: every sink a row can ever hold, the window and one group must fit."""
        cfg = self.config
        if cfg.max_cache_tokens is None:
            return
        n_content = self.content_ids.numel() * cfg.content_sink_occurrences
        need = len(self.positional) + n_content + cfg.window + cfg.key_group_size
        check(cfg.max_cache_tokens >= need,
              f"{len(self.positional)} positional + up to {n_content} content sinks + window {cfg.window} + one "
              f"key group do not fit in max_cache_tokens={cfg.max_cache_tokens}; allowed: >= {need}")

    def reset(self) -> None:
        self.real: torch.Tensor | None = None  # bool [B, L] of the running forward; None: all real
        self.ragged = False  # the rows are stored apart (sticky until reset)
        self.row_seen: list[int] = []  # real tokens per row before the running forward
        self.content_seen: dict[tuple[int, int], int] = {}  # (row, token id) -> occurrences kept
        self.new_sinks: dict[int, list[int]] = {}  # row -> row-relative content-sink positions
        self._rows: int | None = None

    def rows(self) -> int:
        """Batch rows seen so far (1 before the first forward)."""
        return self._rows or 1

    def begin(self, input_ids: torch.Tensor | None, attention_mask: Any, seen: int, has_embeds: bool) -> None:
        """Record the real tokens and the content sinks of a forward over positions ``seen..``."""
        check(attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2),
              f"SinkQuantCache takes a 2-D padding attention_mask [batch, past + new tokens], got "
              f"{_describe(attention_mask)}; a 4-D or custom mask (packed sequences, prefix-LM, tree attention) "
              "is not supported; allowed: a 2-D 0/1 padding mask or none")
        check(self.content_ids.numel() == 0 or input_ids is not None or not has_embeds,
              "kv_cache.content_sinks needs input_ids to find the content sinks; allowed: input_ids "
              "instead of inputs_embeds, or content_sinks: false")
        self.real = None
        if attention_mask is not None and not bool(attention_mask.all()):
            self.real = attention_mask[:, seen:].bool().cpu()
            check(input_ids is None or self.real.shape[1] == input_ids.shape[1],
                  f"attention_mask covers {attention_mask.shape[1]} positions, but the cache holds {seen} and "
                  f"this forward brings {input_ids.shape[1] if input_ids is not None else '?'}; allowed: a mask "
                  "over every past and new position")
        rows = self.real.shape[0] if self.real is not None else (
            input_ids.shape[0] if input_ids is not None and input_ids.dim() == 2 else self.rows())
        if self._rows is None or not self.row_seen:
            self.row_seen = [0] * rows
        self._rows = rows
        self.ragged = self.ragged or self.real is not None or (rows > 1 and self.content_ids.numel() > 0)
        self._observe(input_ids)

    def end(self, length: int) -> None:
        """The forward over ``length`` new positions is stored: advance the row counters."""
        real = self.real.sum(-1).tolist() if self.real is not None else [length] * len(self.row_seen)
        self.row_seen = [a + b for a, b in zip(self.row_seen, real)]

    def _observe(self, input_ids: torch.Tensor | None) -> None:
        self.new_sinks = {}
        if self.content_ids.numel() == 0 or input_ids is None or input_ids.dim() != 2:
            return
        ids = input_ids.cpu()
        real = self.real if self.real is not None else torch.ones_like(ids, dtype=torch.bool)
        index = real.long().cumsum(-1) - 1  # row-relative index of each real token in this chunk
        hits = torch.isin(ids, self.content_ids) & real
        for b, j in hits.nonzero().tolist():
            key = (b, int(ids[b, j]))
            if self.content_seen.get(key, 0) < self.config.content_sink_occurrences:
                self.content_seen[key] = self.content_seen.get(key, 0) + 1
                self.new_sinks.setdefault(b, []).append(self.row_seen[b] + int(index[b, j]))

    def select_rows(self, rows: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``rows[i]`` (beam search reorders, repeats)."""
        old_rows = rows.tolist()
        if self.real is not None:
            self.real = self.real[rows]
        if self.row_seen:
            self.row_seen = [self.row_seen[r] for r in old_rows]
        old = self.content_seen
        self.content_seen = {(i, t): n for i, r in enumerate(old_rows) for (b, t), n in old.items() if b == r}
        self._rows = rows.numel()


def _describe(mask: Any) -> str:
    if isinstance(mask, torch.Tensor):
        return f"a {mask.dim()}-D tensor of shape {list(mask.shape)}"
    return type(mask).__name__
