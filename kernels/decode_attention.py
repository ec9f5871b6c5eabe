"""Triton flash-decoding over the sink-aware cache: fp16 sinks + packed int2/4/8 body + fp16 window.

One launch of :func:`_sink_decode_attention_kernel` per call, grid ``(B * Hkv, splits, m_blocks)``:
each program owns one KV head of one sequence, a contiguous range of key tiles (split-K over
the three regions) and a block of query rows; :func:`_reduce_kernel` merges the splits.

- GQA: the ``g * Lq`` queries that share a KV head are the rows of one ``tl.dot``.
- Keys (per-channel scales in groups of ``Gk`` tokens): one tile lies in one group, so the
  scale folds into the query (``(q * s) . code``) and the zero into a per-row bias (``q . z``).
  fp16 key outliers (a slot and a correction per channel and group) add ``q . delta`` through
  one more small dot per part.
- Values (per-token scales in groups of ``Gv`` channels): every query row is repeated once per
  value group (``NG = D // Gv`` rows), row ``(m, g)`` multiplies ``p`` by the scales of group
  ``g``, and each output channel finally reads the row of its own group. The repeats fill the
  ``M >= 16`` padding that ``tl.dot`` needs anyway.
- Planar codes: part ``i`` of a packed tile (``(bytes >> i * bits) & mask``) holds the
  contiguous channels ``[i * P, (i + 1) * P)``, so scores are ``sum_i (q_i * s_i) . code_i``
  and each value part has its own accumulator: no shuffles (see ``_decode_tiles``). fp16
  queries convert codes with the exponent trick (``(code | 0x6400)`` bitcast to fp16, minus
  1024), pure Triton, so the interpreter runs it.

The public wrapper is :func:`quantsink.kernels.decode_attention.sink_decode_attention`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quantsink.kernels._decode_launch import launch
from quantsink.kernels._decode_tiles import _body_tile, _dense_tile, _sink_logit2, _store
from quantsink.kv.primitives import PackedBlock

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read by triton.jit at decoration


@triton.jit
def _query_part(q_ptr, q_row, ok, qk_scale, I: tl.constexpr, PK: tl.constexpr):
    """Scaled fp32 query channels [I*PK, (I+1)*PK): the body folds key scales into these."""
    offs = q_row[:, None] + I * PK + tl.arange(0, PK)[None, :]
    return tl.load(q_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32) * qk_scale


@triton.jit
def _load_queries(q_ptr, qs_ptr, q_row, row_ok, qk_scale, D: tl.constexpr, KBITS: tl.constexpr,
                  CDT: tl.constexpr):
    """Unscaled q and q_sink [MR, D] in CDT (fp16 regions) and the scaled fp32 key parts of q."""
    PK: tl.constexpr = D * KBITS // 8
    q_off = q_row[:, None] + tl.arange(0, D)[None, :]
    qc = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0).to(CDT)
    qsc = tl.load(qs_ptr + q_off, mask=row_ok[:, None], other=0.0).to(CDT)
    qv0 = _query_part(q_ptr, q_row, row_ok, qk_scale, 0, PK)
    qv1, qv2, qv3 = qv0, qv0, qv0  # (unused parts)
    if KBITS <= 4:
        qv1 = _query_part(q_ptr, q_row, row_ok, qk_scale, 1, PK)
    if KBITS == 2:
        qv2 = _query_part(q_ptr, q_row, row_ok, qk_scale, 2, PK)
        qv3 = _query_part(q_ptr, q_row, row_ok, qk_scale, 3, PK)
    return qc, qsc, qv0, qv1, qv2, qv3


@triton.jit
def _sink_decode_attention_kernel(
        q_ptr, qs_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr, mask_ptr, mask_sb,
        sk_ptr, sv_ptr, s_sb, s_sh, s_st, wk_ptr, wv_ptr, w_sb, w_sh, w_st,
        kc_ptr, kc_sb, kc_sh, kc_st, ks_ptr, kz_ptr, ks_sb, ks_sh, ks_sg,
        vc_ptr, vc_sb, vc_sh, vc_st, vs_ptr, vz_ptr, vs_sb, vs_sh, vs_st,
        oi_ptr, od_ptr, o_sb, o_sh, o_sg, sl_ptr, Hkv, R, R_PAD, Lq, S0, T, OFF, W, GK, SPLITS, SW,
        qk_scale, cap2,
        D: tl.constexpr, BLOCK_M: tl.constexpr, NG: tl.constexpr, GV: tl.constexpr,
        BLOCK_N: tl.constexpr, DENSE_N: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
        VSYM: tl.constexpr, NOUT: tl.constexpr, HAS_BODY: tl.constexpr, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr, CDT: tl.constexpr, EXP_TRICK: tl.constexpr, PREC: tl.constexpr,
        HILO: tl.constexpr, SLIDE: tl.constexpr, SOFTCAP: tl.constexpr, SINKL: tl.constexpr):
    """Program (KV head of a sequence, split, query-row block): online softmax over its tiles.

    Rows ``r`` of every tile are (query row ``r // NG``, value group ``r % NG``); tiles are
    numbered sinks, body, window and split evenly; ``_store`` writes the result. SLIDE masks
    body/window keys outside each row's sliding window of SW keys (sinks stay visible);
    SOFTCAP caps the scores; SINKL adds learned sink logits to the denominators.
    """
    bh, split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (bh // Hkv).to(tl.int64), (bh % Hkv).to(tl.int64)  # int64: caches can exceed 2 GiB
    MR: tl.constexpr = BLOCK_M * NG
    PV: tl.constexpr = D * VBITS // 8
    r = tl.arange(0, MR)
    row, gsel = pid_m * BLOCK_M + r // NG, r % NG  # query row (head-major, then Lq), value group
    qc, qsc, qv0, qv1, qv2, qv3 = _load_queries(q_ptr, qs_ptr, (bh * R + row) * D, row < R, qk_scale,
                                                D, KBITS, CDT)
    limit = S0 + T + W - Lq + row % Lq  # causal: row sees keys [0, limit]
    mask_base = mask_ptr + b * mask_sb
    acc0 = tl.zeros([MR, PV], dtype=tl.float32)  # one accumulator per planar part of the values
    acc1, acc2, acc3 = acc0, acc0, acc0  # (unused ones are never updated)
    zacc = tl.zeros([MR], dtype=tl.float32)
    m_i = tl.full([MR], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([MR], dtype=tl.float32)
    n_s, n_b = tl.cdiv(S0, DENSE_N), (OFF + T) // BLOCK_N  # tiles: sinks, body (OFF phantoms), window
    total = n_s + n_b + tl.cdiv(W, DENSE_N)
    per_split = tl.cdiv(total, SPLITS)
    lo, hi = split * per_split, tl.minimum(total, (split + 1) * per_split)
    for t in range(lo, tl.minimum(hi, n_s)):  # fp16 sinks, own query
        acc0, acc1, acc2, acc3, m_i, l_i = _dense_tile(
            acc0, acc1, acc2, acc3, m_i, l_i, qsc, qk_scale, sk_ptr + b * s_sb + h * s_sh,
            sv_ptr + b * s_sb + h * s_sh, s_st, t * DENSE_N, S0, 0, mask_base, limit, SW, cap2, HAS_MASK,
            IS_CAUSAL, False, SOFTCAP, DENSE_N, D, VBITS, CDT, PREC, HILO)
    if HAS_BODY:
        for t in range(tl.maximum(lo, n_s), tl.minimum(hi, n_s + n_b)):  # packed body
            acc0, acc1, acc2, acc3, zacc, m_i, l_i = _body_tile(
                acc0, acc1, acc2, acc3, zacc, m_i, l_i, qv0, qv1, qv2, qv3, t - n_s,
                kc_ptr + b * kc_sb + h * kc_sh, kc_st, ks_ptr + b * ks_sb + h * ks_sh,
                kz_ptr + b * ks_sb + h * ks_sh, ks_sg, vc_ptr + b * vc_sb + h * vc_sh, vc_st,
                vs_ptr + b * vs_sb + h * vs_sh, vz_ptr + b * vs_sb + h * vs_sh, vs_st,
                oi_ptr + b * o_sb + h * o_sh, od_ptr + b * o_sb + h * o_sh, o_sg, S0, gsel,
                mask_base, limit, GK, OFF, SW, cap2, HAS_MASK, IS_CAUSAL, SLIDE, SOFTCAP, MR, BLOCK_N, D,
                KBITS, VBITS, VSYM, NOUT, CDT, EXP_TRICK, PREC)
        acc0, acc1 = acc0 + zacc[:, None], acc1 + zacc[:, None]  # the window tiles rescale acc only
        acc2, acc3 = acc2 + zacc[:, None], acc3 + zacc[:, None]
    for t in range(tl.maximum(lo, n_s + n_b), hi):  # fp16 window
        acc0, acc1, acc2, acc3, m_i, l_i = _dense_tile(
            acc0, acc1, acc2, acc3, m_i, l_i, qc, qk_scale, wk_ptr + b * w_sb + h * w_sh,
            wv_ptr + b * w_sb + h * w_sh, w_st, (t - n_s - n_b) * DENSE_N, W, S0 + T, mask_base,
            limit, SW, cap2, HAS_MASK, IS_CAUSAL, SLIDE, SOFTCAP, DENSE_N, D, VBITS, CDT, PREC, HILO)
    _store(acc0, acc1, acc2, acc3, m_i, l_i, out_ptr, po_ptr, pm_ptr, pl_ptr, sl_ptr, bh, split, pid_m, R,
           R_PAD, SPLITS, Hkv, Lq, D, BLOCK_M, NG, GV, VBITS, SINGLE_SPLIT, SINKL)


@triton.jit
def _reduce_kernel(out_ptr, po_ptr, pm_ptr, pl_ptr, sl_ptr, R, R_PAD, SPLITS, Hkv, Lq,
                   D: tl.constexpr, RB: tl.constexpr, SPLITS_P2: tl.constexpr, SINKL: tl.constexpr):
    """Merge the per-split (m, l, unnormalized acc) of rows [pid*RB, ...) of one KV head
    (with SINKL, each row's learned sink logit joins the denominator)."""
    bh, pid = tl.program_id(0), tl.program_id(1)
    rows = pid * RB + tl.arange(0, RB)
    sp = tl.arange(0, SPLITS_P2)
    st = (bh * SPLITS + sp[:, None]) * R_PAD + rows[None, :]  # [SPLITS_P2, RB]
    live = (sp < SPLITS)[:, None] & (rows < R_PAD)[None, :]
    m = tl.load(pm_ptr + st, mask=live, other=-1.0e30)  # as the kernel's start value
    m_max = tl.max(m, 0)
    l_sum = tl.sum(tl.exp2(m - m_max[None, :]) * tl.load(pl_ptr + st, mask=live, other=0.0), 0)
    if SINKL:
        l_sum += tl.exp2(_sink_logit2(sl_ptr, bh, rows, R, Hkv, Lq) - m_max)
    acc = tl.zeros([RB, D], dtype=tl.float32)
    cols = tl.arange(0, D)
    for s in range(SPLITS):
        prow = (bh * SPLITS + s) * R_PAD + rows
        w = tl.exp2(tl.load(pm_ptr + prow, mask=rows < R_PAD, other=-1.0e30) - m_max)
        o = tl.load(po_ptr + prow[:, None] * D + cols[None, :], mask=(rows < R_PAD)[:, None], other=0.0)
        acc += w[:, None] * o
    acc = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(out_ptr + (bh * R + rows)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows < R)[:, None])


def sink_decode_attention(q: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor,
                          body_k: PackedBlock | None, body_v: PackedBlock | None,
                          win_k: torch.Tensor, win_v: torch.Tensor, scale: float,
                          key_mask: torch.Tensor | None = None,
                          q_sink: torch.Tensor | None = None, *,
                          sink_logits: torch.Tensor | None = None,
                          sliding_window: int | None = None,
                          softcap: float | None = None) -> torch.Tensor:
    """Triton version of :func:`quantsink.kv.attention.decode_attention_ref` (same signature).

    Returns ``[B, Hq, Lq, D]`` in ``q.dtype``.

    - q: fp16 or bf16 (GPU), fp32 (exact dots); any GQA ratio.
    - Body: keys/values of 2, 4 or 8 bits (independently), any group sizes the packer allows.
    - Any length in every region (empty sinks, body or window, sinks only); ``key_mask``
      ``[B, S]`` for per-sequence lengths; ``q_sink`` for the sink region.
    - ``Lq > 1``: causal in the kernel (query ``i`` sees keys ``<= S - Lq + i``).
    - ``sink_logits [Hq]`` (learned sinks), ``sliding_window`` (over body and window keys) and
      ``softcap`` as in the reference.
    - Falls back to the torch reference (same result) when head_dim is not 64, 128 or 256,
      the key group size is not a multiple of 16 or a head has more than 16 value groups
      (``quantsink.kv.attention.decode_path`` names the reason).
    - CPU tensors need ``TRITON_INTERPRET=1`` set before triton is imported (no bf16 there).

    Raises :class:`~quantsink.errors.QuantsinkError` on inputs that break the contract.
    """
    return _attention(q, sink_k, sink_v, body_k, body_v, win_k, win_v, scale, key_mask, q_sink,
                      sink_logits=sink_logits, sliding_window=sliding_window, softcap=softcap)


def _attention(*args, num_splits: int | None = None, **extras) -> torch.Tensor:
    """:func:`sink_decode_attention` with the split-K count forced (tests, benchmarks)."""
    return launch(_sink_decode_attention_kernel, _reduce_kernel, INTERPRET, *args, num_splits=num_splits,
                  **extras)
