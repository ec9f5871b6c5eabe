"""One layer of :class:`~quantsink.kv.cache.SinkQuantCache`: fp16 sinks, packed body, fp16 window.

Flush schedule (the same for generation, chunked prefill and teacher-forced evaluation):
after token ``t`` is appended, while the window holds at least ``window + G`` tokens its
oldest ``G`` tokens are quantized into the body (``G`` = ``key_group_size``). The first group
is shortened by the number of leading sinks (``PackedBlock.offset``; see ``_first_offset``),
so with sinks at the first positions key groups end where the token count (sinks included)
is a multiple of ``G``. So token
``t`` already sees a group that its own arrival completed as quantized, and every token is
quantized exactly once. StreamingLLM (``max_cache_tokens = M``): after the flush, while
more than ``M`` tokens are held, the oldest body group is evicted (sinks never are).

``update`` applies a whole chunk of ``L`` tokens at once but records, per flushed token,
the time it was flushed and, per evicted group, the time it was evicted; the attention of
that chunk uses them so that query ``t`` sees exactly the cache of token-by-token decoding.
Evictions are applied by :meth:`SinkQuantLayer.finish` after the chunk's attention.

Sliding-window layers (``sliding_window = W``: query ``q`` sees keys ``q - W < k <= q``)
use the same layout and bits, keep only the leading positional sinks, and at each update
drop the sinks and whole body groups that no query of the chunk or later can see, so they
hold at most ``W + G`` body tokens besides the fp16 window; attention masks the rest by
position. StreamingLLM eviction does not apply to them (they are bounded already).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from quantsink.hf.cache_api import CacheLayerMixin

from quantsink.errors import QuantsinkError, check
from quantsink.kv.config import KVConfig
from quantsink.kv.primitives import (PackedBlock, cat_blocks, map_rows, quantize_keys,
                                     quantize_values, slice_block)

NEVER = torch.iinfo(torch.int64).max
_NO_TIMES = torch.empty(0, dtype=torch.long)  # never written to


@dataclass
class Step:
    """What the last ``update`` did, for the attention of that chunk (transient)."""

    q_pos: torch.Tensor  # [L] absolute positions of the chunk's tokens (the queries)
    flushed_k: torch.Tensor | None  # fp16 [B, H, F*G, D]: the tokens flushed in this chunk
    flushed_v: torch.Tensor | None
    flush_time: torch.Tensor  # [F*G] query positions >= this see the quantized version
    evict_time: torch.Tensor  # [E] per evicted group: query positions >= this do not see it
    evicted_before: int  # non-sink tokens evicted before this chunk


class SinkQuantLayer(CacheLayerMixin):
    """Three-region KV storage of one attention layer (tensors ``[B, Hkv, T, D]``)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, config: KVConfig, sliding_window: int | None = None) -> None:
        super().__init__()
        self.cfg, self.sliding_window = config, sliding_window
        self.is_sliding = sliding_window is not None
        self.consumed = True  # the attention has read the last update
        self.sink_set: list[int] = []
        self.key_offset = 0
        self.sink_pos: list[int] = []
        self.seen = 0  # tokens seen, evicted included (get_seq_length)
        self.n_nonsink = 0
        self.evicted = 0  # oldest non-sink tokens dropped (StreamingLLM)
        self.sink_k = self.sink_v = self.win_k = self.win_v = None
        self.body_k: PackedBlock | None = None
        self.body_v: PackedBlock | None = None
        self.kernel: str | None = None  # decode attention path of the last step (decode_path)
        self.step: Step | None = None

    def set_sinks(self, positions: list[int]) -> None:
        """Absolute positions kept in fp16 (call before the first update).

        A sliding layer keeps only the leading run ``0, 1, ...`` of them, so that its
        non-sink positions stay consecutive (the decode kernel's window rule needs that).
        """
        wanted = sorted(set(int(p) for p in positions))
        if self.is_sliding:
            wanted = [p for i, p in enumerate(wanted) if p == i]
        self.sink_set = wanted
        self.key_offset = sum(p < self.cfg.key_group_size for p in self.sink_set) % self.cfg.key_group_size

    def admit_sinks(self, positional: list[int], new: list[int] | None) -> None:
        """Before an update: the positional sinks (first update) and newly found content sinks."""
        if not self.is_initialized:
            self.set_sinks(positional)
        if new:
            self.add_sinks(new)

    def add_sinks(self, positions: list[int]) -> None:
        """More sink positions (content sinks), none of them seen yet; none in sliding layers."""
        check(all(p >= self.seen for p in positions), "sinks can only be added for tokens not yet stored")
        if self.is_sliding:
            return
        self.sink_set = sorted(set(self.sink_set) | {int(p) for p in positions})

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.cfg.dense_dtype == "model":
            self.store_dtype = key_states.dtype
        else:
            self.store_dtype = torch.bfloat16 if key_states.dtype == torch.bfloat16 else torch.float16
        empty = key_states[:, :, :0].to(self.store_dtype)
        self.sink_k, self.sink_v, self.win_k, self.win_v = empty, empty, empty, empty
        self.is_initialized = True

    # -- update ------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, H, L, D]`` keys/values (flushes and evictions are scheduled)."""
        self.finish()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_shape(key_states)
        L = key_states.shape[2]
        if L == 1 and self.seen not in self.sink_set:
            return self._decode_update(key_states, value_states)
        pos = torch.arange(self.seen, self.seen + L)
        is_sink = torch.isin(pos, torch.tensor(self.sink_set, dtype=torch.long))
        kept_before = self.num_held()
        sd = self.store_dtype
        if bool(is_sink.any()):
            idx = is_sink.nonzero()[:, 0].to(key_states.device)
            self.sink_k = torch.cat([self.sink_k, key_states.index_select(2, idx).to(sd)], 2)
            self.sink_v = torch.cat([self.sink_v, value_states.index_select(2, idx).to(sd)], 2)
            self.sink_pos += pos[is_sink].tolist()
        idx = (~is_sink).nonzero()[:, 0]
        new_times = pos[idx]
        w0 = self.win_k.shape[2]
        self.win_k = torch.cat([self.win_k, key_states.index_select(2, idx.to(key_states.device)).to(sd)], 2)
        self.win_v = torch.cat([self.win_v, value_states.index_select(2, idx.to(key_states.device)).to(sd)], 2)
        self.n_nonsink += idx.numel()
        self.step = Step(pos, None, None, torch.empty(0, dtype=torch.long),
                         self._evictions(kept_before, L), self.evicted)
        self._flush(w0, new_times)
        self.seen += L
        self.consumed = False
        return key_states, value_states

    def _decode_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """:meth:`update` for one non-sink token (decode): the same state, fewer ops."""
        kept_before, w0, sd = self.num_held(), self.win_k.shape[2], self.store_dtype
        self.win_k = torch.cat([self.win_k, key_states.to(sd)], 2)
        self.win_v = torch.cat([self.win_v, value_states.to(sd)], 2)
        self.n_nonsink += 1
        pos = torch.tensor([self.seen])
        self.step = Step(pos, None, None, _NO_TIMES, self._evictions(kept_before, 1), self.evicted)
        self._flush(w0, pos)
        self.seen += 1
        self.consumed = False
        return key_states, value_states

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store ``[B, H, L, D]`` keys/values that no attention will read now (benchmarks, tests)."""
        self.update(key_states, value_states)
        self.finish()
        self.consumed = True

    def _check_shape(self, key_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        held = tuple(self.sink_k.shape[i] for i in (0, 1, 3))
        check(held == (B, H, D), f"the cache holds batch {held[0]}, {held[1]} KV heads, head_dim {held[2]}, "
                                 f"but this forward brings batch {B}, {H} KV heads, head_dim {D}; allowed: "
                                 "the same batch and model as the first forward, or cache.reset()")

    def _flush(self, w0: int, new_times: torch.Tensor) -> None:
        R, G, cfg = self.cfg.window, self.cfg.key_group_size, self.cfg
        off = self._first_offset() if self.body_k is None else 0
        over = self.win_k.shape[2] - R  # tokens beyond the window
        if over < G - off:
            return
        sizes = torch.full((1 + (over - G + off) // G,), G)
        sizes[0] = G - off  # the first group of the body may be shortened
        total = int(sizes.sum())
        n = R + sizes.cumsum(0) - w0  # 1-based index of the token that completes each group
        k, v = self.win_k[:, :, :total], self.win_v[:, :, :total]
        bk = quantize_keys(k.float(), cfg.key_bits, G, clip=cfg.clip, offset=off, outliers=cfg.key_outliers)
        bv = quantize_values(v.float(), cfg.value_bits, cfg.value_group_for(v.shape[-1]), clip=cfg.clip,
                             symmetric=cfg.value_symmetric)
        self.body_k, self.body_v = cat_blocks(self.body_k, bk), cat_blocks(self.body_v, bv)
        self.win_k, self.win_v = self.win_k[:, :, total:], self.win_v[:, :, total:]
        self.step.flushed_k, self.step.flushed_v = k, v
        self.step.flush_time = new_times[n - 1].repeat_interleave(sizes)

    def _first_offset(self) -> int:
        """Key slots of the first group taken by the sinks, so groups end on multiples of G.

        Counts the sinks known before the first update that lie in the first ``G`` positions
        (content sinks found later do not count, so every chunking flushes the same groups).
        Not in StreamingLLM mode, whose evictions drop whole groups of ``G``.
        """
        return 0 if self.cfg.max_cache_tokens is not None else self.key_offset

    def _evictions(self, kept_before: int, L: int) -> torch.Tensor:
        """Times at which the oldest body groups leave the cache during this chunk."""
        M, G = self.cfg.max_cache_tokens, self.cfg.key_group_size
        if M is None or self.is_sliding or kept_before + L <= M:
            return _NO_TIMES
        n_evict = -(-(kept_before + L - M) // G)
        return self.seen + (M - kept_before) + G * torch.arange(n_evict)

    def finish(self, next_query: int | None = None) -> None:
        """Apply the evictions of the last chunk and drop its transient data.

        A sliding layer also drops what no query at position ``>= next_query`` (default: the
        next token) can see any more.
        """
        step, self.step = self.step, None
        if self.is_sliding:
            self._slide((self.seen if next_query is None else next_query) - self.sliding_window)
        if step is None or step.evict_time.numel() == 0:
            return
        drop = step.evict_time.numel() * self.cfg.key_group_size
        n_body = self.body_k.num_tokens if self.body_k is not None else 0
        if n_body < drop:
            raise QuantsinkError(f"kv_cache.max_cache_tokens={self.cfg.max_cache_tokens} is too small for "
                                 f"{len(self.sink_pos)} sinks + window; allowed: a larger cache")
        self.body_k = slice_block(self.body_k, drop, n_body)
        self.body_v = slice_block(self.body_v, drop, n_body)
        self.evicted += drop

    # -- views -------------------------------------------------------------------------
    def num_held(self) -> int:
        """Tokens held now (sinks + body + window)."""
        if not self.is_initialized:
            return 0
        body = self.body_k.num_tokens if self.body_k is not None else 0
        return self.sink_k.shape[2] + body + self.win_k.shape[2]

    def nonsink_positions(self, start: int, stop: int) -> torch.Tensor:
        """Absolute positions of the non-sink tokens with indices ``[start, stop)``."""
        pos = torch.arange(start, stop)
        for s in self.sink_set:  # ascending: shift past every sink at or before
            pos = pos + (pos >= s).long()
        return pos

    def positions(self) -> torch.Tensor:
        """Positions of the held keys in region order: sinks, body, window."""
        n_body = self.body_k.num_tokens if self.body_k is not None else 0
        body_win = self.nonsink_positions(self.evicted, self.evicted + n_body + self.win_k.shape[2])
        return torch.cat([torch.tensor(self.sink_pos, dtype=torch.long), body_win])

    def held_elements(self) -> int:
        """K and V elements held now (for the average bits)."""
        if not self.is_initialized:
            return 0
        B, H, _, D = self.sink_k.shape
        return 2 * B * H * D * self.num_held()

    def nbytes(self) -> int:
        """Bytes of the persistent tensors (sinks, body codes/scales/zeros, window)."""
        if not self.is_initialized:
            return 0
        total = sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.win_k, self.win_v))
        return total + sum(b.nbytes() for b in (self.body_k, self.body_v) if b is not None)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1 if self.cfg.max_cache_tokens is None else self.cfg.max_cache_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        self.__init__(self.cfg, self.sliding_window)

    # -- sliding window ----------------------------------------------------------------
    def _slide(self, threshold: int) -> None:
        """Drop the sinks and whole body groups at positions ``<= threshold`` (seen by no query)."""
        if not self.is_initialized or threshold < 0:
            return
        keep = [i for i, p in enumerate(self.sink_pos) if p > threshold]
        if len(keep) < len(self.sink_pos):
            idx = torch.tensor(keep, dtype=torch.long, device=self.sink_k.device)
            self.sink_k, self.sink_v = self.sink_k.index_select(2, idx), self.sink_v.index_select(2, idx)
            self.sink_pos = [self.sink_pos[i] for i in keep]
        n_body = self.body_k.num_tokens if self.body_k is not None else 0
        if n_body == 0:
            return
        pos = self.nonsink_positions(self.evicted, self.evicted + n_body)
        count, G, off = int((pos <= threshold).sum()), self.cfg.key_group_size, self.body_k.offset
        first = G - off if off else G  # the first group may be shortened by the sinks
        drop = 0 if count < first else first + (count - first) // G * G
        if drop:
            self.body_k = slice_block(self.body_k, drop, n_body)
            self.body_v = slice_block(self.body_v, drop, n_body)
            self.evicted += drop

    # -- batch operations (beam search) --------------------------------------------------
    def _map_rows(self, fn) -> None:
        """Apply ``fn`` (a map over the batch dim 0) to every stored tensor."""
        self.finish()
        if not self.is_initialized:
            return
        self.sink_k, self.sink_v, self.win_k, self.win_v = (fn(t) for t in (self.sink_k, self.sink_v,
                                                                           self.win_k, self.win_v))
        self.body_k = None if self.body_k is None else map_rows(self.body_k, fn)
        self.body_v = None if self.body_v is None else map_rows(self.body_v, fn)

    def select_rows(self, rows: torch.Tensor) -> "SinkQuantLayer":
        """A new, independent layer holding rows ``rows`` of this one (this one is unchanged)."""
        self.finish()
        new = copy.copy(self)
        new.sink_set, new.sink_pos = list(self.sink_set), list(self.sink_pos)
        new._map_rows(lambda t: t.index_select(0, rows.to(t.device)))
        return new

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep rows ``beam_idx`` (in that order)."""
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device)])

    def crop(self, max_length: int) -> None:
        raise QuantsinkError("SinkQuantCache cannot be cropped (its packed body is append-only); allowed: "
                             "generation without assisted decoding / DoLa / contrastive search")

    def offload(self) -> None:
        raise QuantsinkError("SinkQuantCache does not support offloading; allowed: keep it on its device")

    def prefetch(self) -> None:
        raise QuantsinkError("SinkQuantCache does not support offloading; allowed: keep it on its device")
