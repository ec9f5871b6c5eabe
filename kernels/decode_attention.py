"""Triton flash-decoding over the sink-aware cache: fp16 sinks + packed int2/4/8 body + fp16 window.

One launch of :func:`_sink_decode_attention_kernel` per call, grid ``(B * Hkv, splits, m_blocks)``:
each program owns one KV head of one sequence, a contiguous range of key tiles (split-K over
the three regions) and a block of query rows; :func:`_reduce_kernel` merges the splits.

- GQA: the ``g * Lq`` queries that share a KV head are the rows of one ``tl.dot``.
- Keys (per-channel scales in groups of ``Gk`` tokens): one tile lies in one group, so the
  scale folds into the query (``(q * s) . code``) and the zero into a per-row bias (``q . z``).
- Values (per-token scales in groups of ``Gv`` channels): every query row is repeated once per
  value group (``NG = D // Gv`` rows), row ``(m, g)`` multiplies ``p`` by the scales of group
  ``g``, and each output channel finally reads the row of its own group. The repeats fill the
  ``M >= 16`` padding that ``tl.dot`` needs anyway.
- Planar codes are unpacked with shifts and ``tl.join``: the tile's column ``c`` holds channel
  ``(c % per) * P + c // per``; queries, fp16 keys/values and outputs use the same permutation,
  so no shuffle is needed. fp16 queries convert codes with the exponent trick
  (``(code | 0x6400)`` bitcast to fp16, minus 1024), pure Triton, so the interpreter runs it.

The public wrapper is :func:`quantsink.kernels.decode_attention.sink_decode_attention`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quantsink.kernels._decode_launch import launch
from quantsink.kv.primitives import PackedBlock

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read by triton.jit at decoration


@triton.jit
def _to_float(codes, CDT: tl.constexpr, EXP_TRICK: tl.constexpr):
    """uint8 codes -> CDT; with EXP_TRICK, fp16 1024 + code minus 1024 (exact for code < 1024)."""
    if EXP_TRICK:
        out = ((codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0).to(CDT)
    else:
        out = codes.to(CDT)
    return out


@triton.jit
def _unpack(packed, N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, CDT: tl.constexpr,
            EXP_TRICK: tl.constexpr):
    """Packed bytes [N, D * BITS // 8] -> codes [N, D]; column c is channel (c % per) * P + c // per."""
    if BITS == 8:
        out = _to_float(packed, CDT, EXP_TRICK)
    elif BITS == 4:
        lo = _to_float(packed & 15, CDT, EXP_TRICK)
        hi = _to_float(packed >> 4, CDT, EXP_TRICK)
        out = tl.reshape(tl.join(lo, hi), (N, D))
    else:
        a = _to_float(packed & 3, CDT, EXP_TRICK)
        b = _to_float((packed >> 2) & 3, CDT, EXP_TRICK)
        c = _to_float((packed >> 4) & 3, CDT, EXP_TRICK)
        d = _to_float(packed >> 6, CDT, EXP_TRICK)
        out = tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (N, D))  # order a, b, c, d
    return out


@triton.jit
def _key_ok(valid, pos, mask_base, limit, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Which keys each row may attend: [1 or MR, BLOCK_N] bool."""
    ok = valid[None, :]
    if HAS_MASK:
        ok = ok & (tl.load(mask_base + pos, mask=valid, other=0) != 0)[None, :]
    if IS_CAUSAL:
        ok = ok & (pos[None, :] <= limit[:, None])
    return ok


@triton.jit
def _softmax_step(s, ok, m_i, l_i):
    """Online softmax in base 2; m_i starts finite so fully masked rows never give NaN."""
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _dense_tile(acc, m_i, l_i, qc, qk_scale, k_base, v_base, stride_t, t0, n_valid, pos0, chk, chv,
                mask_base, limit, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
                BLOCK_N: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr, HILO: tl.constexpr):
    """One tile of an fp16/bf16/fp32 region (sinks or window) of ``n_valid`` tokens.

    ``qc`` is the unscaled query (exact in CDT); with HILO, p goes to the tensor cores as
    hi + lo halves, so a dominant sink's probability is not rounded to 11 bits.
    """
    tok = t0 + tl.arange(0, BLOCK_N)
    valid = tok < n_valid
    k = tl.load(k_base + tok[:, None] * stride_t + chk[None, :], mask=valid[:, None], other=0.0)
    s = tl.dot(qc, tl.trans(k.to(CDT)), input_precision=PREC) * qk_scale  # [MR, BLOCK_N]
    ok = _key_ok(valid, pos0 + tok, mask_base, limit, HAS_MASK, IS_CAUSAL)
    p, alpha, m_i, l_i = _softmax_step(s, ok, m_i, l_i)
    v = tl.load(v_base + tok[:, None] * stride_t + chv[None, :], mask=valid[:, None], other=0.0)
    p_hi = p.to(CDT)
    acc = acc * alpha[:, None] + tl.dot(p_hi, v.to(CDT), input_precision=PREC)
    if HILO:
        acc += tl.dot((p - p_hi.to(tl.float32)).to(CDT), v.to(CDT))
    return acc, m_i, l_i


@triton.jit
def _body_tile(acc, zacc, m_i, l_i, qv, tb, kc_base, kc_st, ks_base, kz_base, ks_sg, vc_base,
               vc_st, vs_base, vz_base, vs_st, pos0, chk, gsel, mask_base, limit, GK,
               HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
               D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, CDT: tl.constexpr,
               EXP_TRICK: tl.constexpr, PREC: tl.constexpr):
    """One tile of the packed body: key scales folded into q, value scales into p."""
    tok = tb * BLOCK_N + tl.arange(0, BLOCK_N)
    grp = (tb * BLOCK_N) // GK
    sk = tl.load(ks_base + grp * ks_sg + chk).to(tl.float32)  # [D]
    zk = tl.load(kz_base + grp * ks_sg + chk).to(tl.float32)
    kb = tl.load(kc_base + tok[:, None] * kc_st + tl.arange(0, D * KBITS // 8)[None, :])
    k = _unpack(kb, BLOCK_N, D, KBITS, CDT, EXP_TRICK)  # codes [BLOCK_N, D]
    s = tl.dot((qv * sk[None, :]).to(CDT), tl.trans(k), input_precision=PREC)
    s = s + tl.sum(qv * zk[None, :], 1)[:, None]  # [MR, BLOCK_N]
    ok = _key_ok(tok >= 0, pos0 + tok, mask_base, limit, HAS_MASK, IS_CAUSAL)
    p, alpha, m_i, l_i = _softmax_step(s, ok, m_i, l_i)
    vs = tl.load(vs_base + tok[None, :] * vs_st + gsel[:, None]).to(tl.float32)  # [MR, BLOCK_N]
    vz = tl.load(vz_base + tok[None, :] * vs_st + gsel[:, None]).to(tl.float32)
    vb = tl.load(vc_base + tok[:, None] * vc_st + tl.arange(0, D * VBITS // 8)[None, :])
    v = _unpack(vb, BLOCK_N, D, VBITS, CDT, EXP_TRICK)
    acc = acc * alpha[:, None] + tl.dot((p * vs).to(CDT), v, input_precision=PREC)
    zacc = zacc * alpha + tl.sum(p * vz, 1)
    return acc, zacc, m_i, l_i


@triton.jit
def _perm(D: tl.constexpr, BITS: tl.constexpr):
    """Channel held by each unpacked column: (c % per) * P + c // per."""
    c = tl.arange(0, D)
    PER: tl.constexpr = 8 // BITS
    return (c % PER) * (D // PER) + c // PER


@triton.jit
def _store(acc, m_i, l_i, out_ptr, po_ptr, pm_ptr, pl_ptr, bh, split, pid_m, R, R_PAD, SPLITS, chv,
           D: tl.constexpr, BLOCK_M: tl.constexpr, NG: tl.constexpr, GV: tl.constexpr,
           SINGLE_SPLIT: tl.constexpr):
    """Each output channel reads the row of its value group (m and l agree across the repeats);
    write the final output (one split) or this split's (acc, m, l)."""
    onehot = (chv // GV)[None, :] == tl.arange(0, NG)[:, None]  # [NG, D]
    o = tl.sum(tl.where(onehot[None, :, :], tl.reshape(acc, (BLOCK_M, NG, D)), 0.0), 1)
    m_o = tl.max(tl.reshape(m_i, (BLOCK_M, NG)), 1)
    l_o = tl.max(tl.reshape(l_i, (BLOCK_M, NG)), 1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if SINGLE_SPLIT:
        o = o / tl.where(l_o > 0, l_o, 1.0)[:, None]  # fully masked rows: acc = 0 -> 0
        tl.store(out_ptr + (bh * R + rows)[:, None] * D + chv[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=(rows < R)[:, None])
    else:
        prow = (bh * SPLITS + split) * R_PAD + rows
        tl.store(po_ptr + prow[:, None] * D + chv[None, :], o)
        tl.store(pm_ptr + prow, m_o)
        tl.store(pl_ptr + prow, l_o)


@triton.jit
def _sink_decode_attention_kernel(
        q_ptr, qs_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr, mask_ptr, mask_sb,
        sk_ptr, sv_ptr, s_sb, s_sh, s_st, wk_ptr, wv_ptr, w_sb, w_sh, w_st,
        kc_ptr, kc_sb, kc_sh, kc_st, ks_ptr, kz_ptr, ks_sb, ks_sh, ks_sg,
        vc_ptr, vc_sb, vc_sh, vc_st, vs_ptr, vz_ptr, vs_sb, vs_sh, vs_st,
        Hkv, R, R_PAD, Lq, S0, T, W, GK, SPLITS, qk_scale,
        D: tl.constexpr, BLOCK_M: tl.constexpr, NG: tl.constexpr, GV: tl.constexpr,
        BLOCK_N: tl.constexpr, DENSE_N: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
        HAS_BODY: tl.constexpr, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr, CDT: tl.constexpr, EXP_TRICK: tl.constexpr, PREC: tl.constexpr,
        HILO: tl.constexpr):
    """Program (KV head of a sequence, split, query-row block): online softmax over its tiles.

    Rows ``r`` of every tile are (query row ``r // NG``, value group ``r % NG``); tiles are
    numbered sinks, body, window and split evenly; ``_store`` writes the result.
    """
    bh, split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (bh // Hkv).to(tl.int64), (bh % Hkv).to(tl.int64)  # int64: caches can exceed 2 GiB
    MR: tl.constexpr = BLOCK_M * NG
    r = tl.arange(0, MR)
    row, gsel = pid_m * BLOCK_M + r // NG, r % NG  # query row (head-major, then Lq), value group
    chk, chv = _perm(D, KBITS), _perm(D, VBITS)
    q_off = (bh * R + row)[:, None] * D + chk[None, :]
    qc = tl.load(q_ptr + q_off, mask=(row < R)[:, None], other=0.0)
    qsc = tl.load(qs_ptr + q_off, mask=(row < R)[:, None], other=0.0).to(CDT)
    qv, qc = qc.to(tl.float32) * qk_scale, qc.to(CDT)  # scaled copy for the body fold
    limit = S0 + T + W - Lq + row % Lq  # causal: row sees keys [0, limit]
    mask_base = mask_ptr + b * mask_sb
    acc = tl.zeros([MR, D], dtype=tl.float32)
    zacc = tl.zeros([MR], dtype=tl.float32)
    m_i = tl.full([MR], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([MR], dtype=tl.float32)
    n_s, n_b = tl.cdiv(S0, DENSE_N), T // BLOCK_N  # tiles: sinks, body, window
    total = n_s + n_b + tl.cdiv(W, DENSE_N)
    per_split = tl.cdiv(total, SPLITS)
    lo, hi = split * per_split, tl.minimum(total, (split + 1) * per_split)
    for t in range(lo, tl.minimum(hi, n_s)):  # fp16 sinks, own query
        acc, m_i, l_i = _dense_tile(
            acc, m_i, l_i, qsc, qk_scale, sk_ptr + b * s_sb + h * s_sh, sv_ptr + b * s_sb + h * s_sh,
            s_st, t * DENSE_N, S0, 0, chk, chv, mask_base, limit, HAS_MASK, IS_CAUSAL,
            DENSE_N, CDT, PREC, HILO)
    if HAS_BODY:
        for t in range(tl.maximum(lo, n_s), tl.minimum(hi, n_s + n_b)):  # packed body
            acc, zacc, m_i, l_i = _body_tile(
                acc, zacc, m_i, l_i, qv, t - n_s, kc_ptr + b * kc_sb + h * kc_sh, kc_st,
                ks_ptr + b * ks_sb + h * ks_sh, kz_ptr + b * ks_sb + h * ks_sh, ks_sg,
                vc_ptr + b * vc_sb + h * vc_sh, vc_st, vs_ptr + b * vs_sb + h * vs_sh,
                vz_ptr + b * vs_sb + h * vs_sh, vs_st, S0, chk, gsel, mask_base, limit, GK,
                HAS_MASK, IS_CAUSAL, BLOCK_N, D, KBITS, VBITS, CDT, EXP_TRICK, PREC)
        acc += zacc[:, None]  # the window tiles below rescale acc only
    for t in range(tl.maximum(lo, n_s + n_b), hi):  # fp16 window
        acc, m_i, l_i = _dense_tile(
            acc, m_i, l_i, qc, qk_scale, wk_ptr + b * w_sb + h * w_sh, wv_ptr + b * w_sb + h * w_sh,
            w_st, (t - n_s - n_b) * DENSE_N, W, S0 + T, chk, chv, mask_base, limit, HAS_MASK,
            IS_CAUSAL, DENSE_N, CDT, PREC, HILO)
    _store(acc, m_i, l_i, out_ptr, po_ptr, pm_ptr, pl_ptr, bh, split, pid_m, R, R_PAD, SPLITS, chv,
           D, BLOCK_M, NG, GV, SINGLE_SPLIT)


@triton.jit
def _reduce_kernel(out_ptr, po_ptr, pm_ptr, pl_ptr, R, R_PAD, SPLITS,
                   D: tl.constexpr, RB: tl.constexpr, SPLITS_P2: tl.constexpr):
    """Merge the per-split (m, l, unnormalized acc) of rows [pid*RB, ...) of one KV head."""
    bh, pid = tl.program_id(0), tl.program_id(1)
    rows = pid * RB + tl.arange(0, RB)
    sp = tl.arange(0, SPLITS_P2)
    st = (bh * SPLITS + sp[:, None]) * R_PAD + rows[None, :]  # [SPLITS_P2, RB]
    live = (sp < SPLITS)[:, None] & (rows < R_PAD)[None, :]
    m = tl.load(pm_ptr + st, mask=live, other=-1.0e30)  # as the kernel's start value
    m_max = tl.max(m, 0)
    l_sum = tl.sum(tl.exp2(m - m_max[None, :]) * tl.load(pl_ptr + st, mask=live, other=0.0), 0)
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
                          q_sink: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of :func:`quantsink.kv.attention.decode_attention_ref` (same signature).

    Returns ``[B, Hq, Lq, D]`` in ``q.dtype``. Configurations the kernel does not cover
    (key group size not a multiple of 16, more than 16 value groups per head) run the reference.
    """
    return _attention(q, sink_k, sink_v, body_k, body_v, win_k, win_v, scale, key_mask, q_sink)


def _attention(*args, num_splits: int | None = None) -> torch.Tensor:
    """:func:`sink_decode_attention` with the split-K count forced (tests, benchmarks)."""
    return launch(_sink_decode_attention_kernel, _reduce_kernel, INTERPRET, *args, num_splits=num_splits)
