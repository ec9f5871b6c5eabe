"""int8 token embedding and lm_head: one fp16 scale per vocabulary row, one tensor when tied.

Format (buffers, saved under these names): ``weight_int8`` int8 ``[V, H]`` (codes -127..127)
and ``weight_scale`` fp16 ``[V]``; row ``v`` is ``weight_int8[v] * weight_scale[v]``
(symmetric, exact in fp32). The row of token ``v`` is both its embedding and the lm_head
output channel of its logit, so a tied model (``tie_word_embeddings``) quantizes the shared
tensor once: :class:`Int8Embedding` owns the buffers (``model.embed_tokens.weight_*``) and the
tied :class:`Int8LMHead` keeps a reference to it and no tensors of its own.

On SmolLM2-135M (tied 49,152 x 576) int8 rows cost +0.11 % perplexity (16k tokens of
WikiText-2 test, ctx 1024); int4 rows (groups of 32..128) cost +9..+15 %, so only 8 bits are
offered. The lm_head product goes through ``quantsink::int8_rows_linear``
(:mod:`quantsink.weights.rows_ops`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantsink.weights.rtn import FP16_TINY


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of ``w: [V, H]``: ``(codes int8 [V, H], scale fp16 [V])``."""
    w = w.detach().float()
    scale = (w.abs().amax(1) / 127).clamp_min(FP16_TINY).half()
    codes = torch.clamp(torch.round(w / scale.float()[:, None]), -127, 127).to(torch.int8)
    return codes, scale


class _Rows(nn.Module):
    """Holder of the int8 rows (``weight_int8``, ``weight_scale``) and the product with them."""

    def __init__(self, rows: int, dim: int, device: torch.device | str | None = None) -> None:
        from quantsink.weights.cpu_int4 import kernel_problem
        from quantsink.weights.ops import ops

        super().__init__()
        ops()  # the product's torch.library op must exist before any torch.compile trace
        self._bf16_host = kernel_problem() is None  # probed now: not inside a compiled graph
        self.register_buffer("weight_int8", torch.zeros(rows, dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(rows, dtype=torch.float16, device=device))

    def load_rows(self, w: torch.Tensor) -> None:
        """Quantize the float weight ``w: [V, H]`` into the buffers."""
        codes, scale = quantize_rows(w)
        self.weight_int8.copy_(codes)
        self.weight_scale.copy_(scale)

    def aligned_rows(self) -> None:
        """Replace unaligned rows (an mmap view) by an aligned copy: the CPU kernel needs one
        for 4 rows or more (``rows_ops``); done on the first such call, not at load."""
        from quantsink.weights.rows_ops import aligned

        w = self.weight_int8
        if w.device.type == "cpu" and w.shape[-1] % 16 == 0 and not aligned(w):
            self.weight_int8 = w.clone()  # the allocator aligns to 64 bytes

    @property
    def kernel(self) -> str:
        """The path of a decode row on the CPU (:func:`~quantsink.weights.rows_ops.rows_kernel`)."""
        from quantsink.weights.rows_ops import rows_kernel

        return rows_kernel(self._bf16_host)

    def dequantize(self) -> torch.Tensor:
        """The effective weight ``[V, H]`` in float32."""
        return self.weight_int8.float() * self.weight_scale.float()[:, None]

    def rows_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [..., H] -> [..., V]`` in ``x.dtype``."""
        from quantsink.weights.rows_ops import INT8_MAX_ROWS, int8_rows_linear, rows_kernel

        if 4 <= x.numel() // x.shape[-1] <= INT8_MAX_ROWS and not torch.compiler.is_compiling() \
                and x.device.type == "cpu" and rows_kernel(self._bf16_host) == "int8pack[bf16]":
            self.aligned_rows()
        return int8_rows_linear(x, self.weight_int8, self.weight_scale, self._bf16_host)


class Int8Embedding(_Rows):
    """``nn.Embedding`` replacement with int8 rows; outputs ``dtype`` (the model's, fp32 by default)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 embed_scale: float = 1.0) -> None:
        super().__init__(num_embeddings, embedding_dim, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.dtype = padding_idx, dtype
        self.embed_scale = embed_scale  # the model's constant factor (Gemma: sqrt(hidden)); not saved

    @classmethod
    def from_float(cls, emb: nn.Embedding, embed_scale: float = 1.0) -> "Int8Embedding":
        """Quantize an ``nn.Embedding`` (its device and dtype are kept) that scales its rows by
        ``embed_scale``."""
        w = emb.weight
        new = cls(w.shape[0], w.shape[1], emb.padding_idx, w.dtype, w.device, embed_scale)
        new.load_rows(w)
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [...] -> [..., H]
        rows = F.embedding(ids, self.weight_int8).float()
        out = (rows * self.weight_scale[ids].float()[..., None]).to(self.dtype)
        if self.embed_scale != 1.0:  # as the scaled embedding does: in the model's dtype
            out = out * torch.tensor(self.embed_scale, dtype=self.dtype, device=out.device)
        return out

    def extra_repr(self) -> str:
        scale = f", embed_scale={self.embed_scale:g}" if self.embed_scale != 1.0 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits=8, dtype={self.dtype}{scale}"


class Int8LMHead(_Rows):
    """``lm_head`` with int8 rows: its own buffers, or those of a tied :class:`Int8Embedding`."""

    def __init__(self, in_features: int, out_features: int, tied: Int8Embedding | None = None,
                 device: torch.device | str | None = None) -> None:
        if tied is None:
            super().__init__(out_features, in_features, device)
        else:
            nn.Module.__init__(self)  # no tensors of its own
            self._bf16_host = tied._bf16_host
        self.in_features, self.out_features = in_features, out_features
        self._tied = (tied,) if tied is not None else ()  # a reference, not a submodule

    @classmethod
    def from_float(cls, head: nn.Linear, tied: Int8Embedding | None = None) -> "Int8LMHead":
        """Quantize an untied ``nn.Linear`` lm_head, or wrap the tied embedding's rows."""
        new = cls(head.in_features, head.out_features, tied, head.weight.device)
        if tied is None:
            new.load_rows(head.weight)
        return new

    @property
    def rows(self) -> _Rows:
        """The module that holds the int8 rows (self, or the tied embedding)."""
        return self._tied[0] if self._tied else self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., H] -> [..., V]
        rows = self.rows
        return _Rows.rows_linear(rows, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=8, "
                f"tied={bool(self._tied)}")
