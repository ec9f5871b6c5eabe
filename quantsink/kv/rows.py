"""A cache layer whose batch rows are stored apart: each row exactly as it would be alone.

A left-padded batch puts each row's first real token at another position, and content sinks
differ from row to row. A shared layout (one set of sink positions, one flush schedule for all
rows) would then keep some rows' pad positions as sinks, quantize other rows' first tokens
like the body, and group each row's keys against other rows' boundaries. So as soon as a
batch is padded (or has several rows and content sinks), :class:`RowsLayer` replaces the
layer: one batch-1 :class:`~quantsink.kv.layer.SinkQuantLayer` per row over that row's real
tokens only (pads are never stored), with the row's own sinks, flush schedule, StreamingLLM
evictions and sliding window, counted from its first real token. Attention runs row by row;
a pad query attends to nothing (zeros). A batch of equal-length rows keeps the shared layout,
which is the same per row.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from quantsink.errors import QuantsinkError, check
from quantsink.hf.cache_api import CacheLayerMixin
from quantsink.kv.layer import SinkQuantLayer

_ROW0 = torch.tensor([0])


class RowsLayer(CacheLayerMixin):
    """One :class:`SinkQuantLayer` per batch row (see the module docstring)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, rows: list[SinkQuantLayer], seen: int) -> None:
        super().__init__()
        self.rows, self.seen = rows, seen  # seen: positions of the padded batch
        self.cfg, self.sliding_window = rows[0].cfg, rows[0].sliding_window
        self.is_sliding = rows[0].is_sliding
        self.is_initialized = any(r.is_initialized for r in rows)
        self.consumed = True
        self.step: list[torch.Tensor] | None = None  # per row: indices of its real tokens in the last chunk

    @property
    def kernel(self) -> str | None:
        """The decode attention paths of the rows' last steps, joined when they differ."""
        paths = sorted({r.kernel for r in self.rows if r.kernel is not None})
        return " | ".join(paths) if paths else None

    @classmethod
    def split(cls, layer: SinkQuantLayer, batch: int) -> "RowsLayer":
        """The rows of ``layer`` (a shared layout, the same per row) as separate layers."""
        if not layer.is_initialized:
            return cls([SinkQuantLayer(layer.cfg, layer.sliding_window) for _ in range(batch)], 0)
        return cls([layer.select_rows(torch.tensor([b])) for b in range(layer.sink_k.shape[0])], layer.seen)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # each row initializes itself on its first real token

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, real: torch.Tensor | None = None,
               new_sinks: Mapping[int, list[int]] | None = None, positional: list[int] | None = None):
        """Append ``[B, H, L, D]``; row ``b`` stores its real tokens (``real[b]``, None: all)."""
        self.finish()
        B, L = key_states.shape[0], key_states.shape[2]
        check(B == len(self.rows), f"the cache holds batch {len(self.rows)}, but this forward brings batch {B}; "
                                   "allowed: the same batch as the first forward, or cache.reset()")
        self.step = []
        for b, row in enumerate(self.rows):
            idx = torch.arange(L) if real is None else real[b].nonzero()[:, 0]
            self.step.append(idx.to(key_states.device))
            if idx.numel() == 0:
                continue
            row.admit_sinks(positional or [], (new_sinks or {}).get(b))
            i = self.step[-1]
            row.update(key_states[b:b + 1].index_select(2, i), value_states[b:b + 1].index_select(2, i))
        self.seen += L
        self.is_initialized, self.consumed = True, False
        return key_states, value_states

    def attend(self, q: torch.Tensor, one: Callable[[SinkQuantLayer, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``[B, Hq, L, D]``: ``one(row_layer, q_row)`` for each row's real queries, zeros for pads."""
        out = torch.zeros_like(q)
        for b, (row, idx) in enumerate(zip(self.rows, self.step)):
            if idx.numel():
                out[b:b + 1, :, idx] = one(row, q[b:b + 1].index_select(2, idx))
        self.consumed = True
        return out

    def finish(self, next_query: int | None = None) -> None:
        for row in self.rows:
            row.finish()
        self.step = None

    # -- views -------------------------------------------------------------------------
    def held_elements(self) -> int:
        return sum(r.held_elements() for r in self.rows)

    def nbytes(self) -> int:
        return sum(r.nbytes() for r in self.rows)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.rows[0].get_max_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    # -- batch operations (beam search) --------------------------------------------------
    def _select(self, rows: list[int]) -> None:
        self.finish()
        self.rows = [self.rows[r].select_rows(_ROW0) for r in rows]  # independent copies

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select([r for r in range(len(self.rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(torch.arange(len(self.rows))[indices.cpu()].tolist())

    def crop(self, max_length: int) -> None:
        self.rows[0].crop(max_length)

    def offload(self) -> None:
        raise QuantsinkError("SinkQuantCache does not support offloading; allowed: keep it on its device")

    def prefetch(self) -> None:
        self.offload()

    def reset(self) -> None:
        self.__init__([SinkQuantLayer(self.cfg, self.sliding_window) for _ in self.rows], 0)
