"""Tile-level pieces of the decode-attention kernel (``@triton.jit`` helpers, inlined).

Planar layout (see :mod:`quantsink.kv.primitives`): byte ``j`` of a packed row holds the
code of channel ``i * P + j`` in bits ``[i * bits, (i + 1) * bits)``. So part ``i`` of a
packed tile ``[N, P]`` is ``(tile >> i * bits) & mask``: the contiguous channels
``[i * P, (i + 1) * P)``. Every product is split by part (``q_lo . k_lo + q_hi . k_hi``,
one accumulator per part of the values): no shuffles, and each part is an elementwise
function of the loaded bytes, which the compiler can apply in the tensor-core operand layout.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _to_float(codes, CDT: tl.constexpr, EXP_TRICK: tl.constexpr):
    """uint8 codes -> CDT; with EXP_TRICK, fp16 1024 + code minus 1024 (exact for code < 1024)."""
    if EXP_TRICK:
        out = ((codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0).to(CDT)
    else:
        out = codes.to(CDT)
    return out


@triton.jit
def _part(packed, I: tl.constexpr, BITS: tl.constexpr, CDT: tl.constexpr, EXP_TRICK: tl.constexpr):
    """Codes of part I (channels [I * P, (I + 1) * P)) of a packed tile [N, P], in CDT."""
    if BITS == 8:
        codes = packed
    else:
        codes = (packed >> (I * BITS)) & ((1 << BITS) - 1)
    return _to_float(codes, CDT, EXP_TRICK)


@triton.jit
def _key_ok(valid, pos, mask_base, limit, SW, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
            SLIDE: tl.constexpr):
    """Which keys each row may attend: [1 or MR, BLOCK_N] bool.

    ``limit`` is each row's own key index; with SLIDE, keys ``<= limit - SW`` are out of the
    row's sliding window (callers pass SLIDE only for body and window tiles).
    """
    ok = valid[None, :]
    if HAS_MASK:
        ok = ok & (tl.load(mask_base + pos, mask=valid, other=0) != 0)[None, :]
    if IS_CAUSAL:
        ok = ok & (pos[None, :] <= limit[:, None])
    if SLIDE:
        ok = ok & (pos[None, :] > (limit - SW)[:, None])
    return ok


@triton.jit
def _softcap(s, cap2):
    """``cap2 * tanh(s / cap2)`` (scores in base-2 units, so cap2 = softcap * log2(e))."""
    y = s / cap2
    return cap2 * (1.0 - 2.0 / (tl.exp2(y * 2.8853900817779268) + 1.0))  # tanh via exp2(2y log2 e)


@triton.jit
def _softmax_step(s, ok, m_i, l_i, cap2, SOFTCAP: tl.constexpr):
    """Online softmax in base 2; m_i starts finite so fully masked rows never give NaN."""
    if SOFTCAP:
        s = _softcap(s, cap2)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _dense_pv(acc, alpha, p_hi, p, v_ptrs, valid, CDT: tl.constexpr, PREC: tl.constexpr,
              HILO: tl.constexpr):
    """acc * alpha + p @ v for one part of an fp16 value tile; HILO adds the rounding of p."""
    v = tl.load(v_ptrs, mask=valid[:, None], other=0.0).to(CDT)
    acc = acc * alpha[:, None] + tl.dot(p_hi, v, input_precision=PREC)
    if HILO:
        acc = tl.dot((p - p_hi.to(tl.float32)).to(CDT), v, acc)
    return acc


@triton.jit
def _dense_tile(acc0, acc1, acc2, acc3, m_i, l_i, qc, qk_scale, k_base, v_base, stride_t, t0,
                n_valid, pos0, mask_base, limit, SW, cap2, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
                SLIDE: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                VBITS: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr, HILO: tl.constexpr):
    """One tile of an fp16/bf16/fp32 region (sinks or window) of ``n_valid`` tokens.

    ``qc`` is the unscaled query (exact in CDT); with HILO, p goes to the tensor cores as
    hi + lo halves, so a dominant sink's probability is not rounded to 11 bits.
    """
    tok = t0 + tl.arange(0, BLOCK_N)
    valid = tok < n_valid
    rows = tok[:, None] * stride_t
    k = tl.load(k_base + rows + tl.arange(0, D)[None, :], mask=valid[:, None], other=0.0)
    s = tl.dot(qc, tl.trans(k.to(CDT)), input_precision=PREC) * qk_scale  # [MR, BLOCK_N]
    ok = _key_ok(valid, pos0 + tok, mask_base, limit, SW, HAS_MASK, IS_CAUSAL, SLIDE)
    p, alpha, m_i, l_i = _softmax_step(s, ok, m_i, l_i, cap2, SOFTCAP)
    p_hi = p.to(CDT)
    PV: tl.constexpr = D * VBITS // 8
    cols = tl.arange(0, PV)[None, :]
    acc0 = _dense_pv(acc0, alpha, p_hi, p, v_base + rows + cols, valid, CDT, PREC, HILO)
    if VBITS <= 4:
        acc1 = _dense_pv(acc1, alpha, p_hi, p, v_base + rows + PV + cols, valid, CDT, PREC, HILO)
    if VBITS == 2:
        acc2 = _dense_pv(acc2, alpha, p_hi, p, v_base + rows + 2 * PV + cols, valid, CDT, PREC, HILO)
        acc3 = _dense_pv(acc3, alpha, p_hi, p, v_base + rows + 3 * PV + cols, valid, CDT, PREC, HILO)
    return acc0, acc1, acc2, acc3, m_i, l_i


@triton.jit
def _qk_part(s, bias, qv, kb, sk_ptr, zk_ptr, I: tl.constexpr, KBITS: tl.constexpr,
             PK: tl.constexpr, CDT: tl.constexpr, EXP_TRICK: tl.constexpr, PREC: tl.constexpr):
    """Part I of the body scores: (q * scale) . codes + q . zero over channels [I*PK, (I+1)*PK)."""
    sk = tl.load(sk_ptr + I * PK + tl.arange(0, PK)).to(tl.float32)
    zk = tl.load(zk_ptr + I * PK + tl.arange(0, PK)).to(tl.float32)
    s = tl.dot((qv * sk[None, :]).to(CDT), tl.trans(_part(kb, I, KBITS, CDT, EXP_TRICK)), s,
               input_precision=PREC)
    return s, bias + tl.sum(qv * zk[None, :], 1)


@triton.jit
def _body_scores(qv0, qv1, qv2, qv3, kb, sk_ptr, zk_ptr, MR: tl.constexpr, BLOCK_N: tl.constexpr,
                 D: tl.constexpr, KBITS: tl.constexpr, CDT: tl.constexpr, EXP_TRICK: tl.constexpr,
                 PREC: tl.constexpr):
    """Scores [MR, BLOCK_N] of a packed key tile, part by part (qv* are the query parts)."""
    PK: tl.constexpr = D * KBITS // 8
    s = tl.zeros([MR, BLOCK_N], dtype=tl.float32)
    bias = tl.zeros([MR], dtype=tl.float32)
    s, bias = _qk_part(s, bias, qv0, kb, sk_ptr, zk_ptr, 0, KBITS, PK, CDT, EXP_TRICK, PREC)
    if KBITS <= 4:
        s, bias = _qk_part(s, bias, qv1, kb, sk_ptr, zk_ptr, 1, KBITS, PK, CDT, EXP_TRICK, PREC)
    if KBITS == 2:
        s, bias = _qk_part(s, bias, qv2, kb, sk_ptr, zk_ptr, 2, KBITS, PK, CDT, EXP_TRICK, PREC)
        s, bias = _qk_part(s, bias, qv3, kb, sk_ptr, zk_ptr, 3, KBITS, PK, CDT, EXP_TRICK, PREC)
    return s + bias[:, None]


@triton.jit
def _outlier_part(s, qv, oi_base, od_base, slot, I: tl.constexpr, PK: tl.constexpr, D: tl.constexpr,
                  NOUT: tl.constexpr, BLOCK_N: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr):
    """Add q . delta for the fp16 key outliers of channels [I*PK, (I+1)*PK) of this tile."""
    cols = I * PK + tl.arange(0, PK)
    corr = tl.zeros([BLOCK_N, PK], dtype=tl.float32)  # [slot, channel]: delta where an outlier sits
    for j in tl.static_range(NOUT):
        oi = tl.load(oi_base + j * D + cols).to(tl.int32)
        od = tl.load(od_base + j * D + cols).to(tl.float32)
        corr += tl.where(oi[None, :] == slot[:, None], od[None, :], 0.0)
    return tl.dot(qv.to(CDT), tl.trans(corr.to(CDT)), s, input_precision=PREC)


@triton.jit
def _outlier_scores(s, qv0, qv1, qv2, qv3, oi_base, od_base, slot, D: tl.constexpr,
                    KBITS: tl.constexpr, NOUT: tl.constexpr, BLOCK_N: tl.constexpr, CDT: tl.constexpr,
                    PREC: tl.constexpr):
    """Scores of a packed key tile plus the corrections of its group's fp16 outliers."""
    PK: tl.constexpr = D * KBITS // 8
    s = _outlier_part(s, qv0, oi_base, od_base, slot, 0, PK, D, NOUT, BLOCK_N, CDT, PREC)
    if KBITS <= 4:
        s = _outlier_part(s, qv1, oi_base, od_base, slot, 1, PK, D, NOUT, BLOCK_N, CDT, PREC)
    if KBITS == 2:
        s = _outlier_part(s, qv2, oi_base, od_base, slot, 2, PK, D, NOUT, BLOCK_N, CDT, PREC)
        s = _outlier_part(s, qv3, oi_base, od_base, slot, 3, PK, D, NOUT, BLOCK_N, CDT, PREC)
    return s


@triton.jit
def _body_tile(acc0, acc1, acc2, acc3, zacc, m_i, l_i, qv0, qv1, qv2, qv3, tb, kc_base, kc_st,
               ks_base, kz_base, ks_sg, vc_base, vc_st, vs_base, vz_base, vs_st, oi_base, od_base,
               o_sg, pos0, gsel, mask_base, limit, GK, OFF, SW, cap2, HAS_MASK: tl.constexpr,
               IS_CAUSAL: tl.constexpr, SLIDE: tl.constexpr, SOFTCAP: tl.constexpr, MR: tl.constexpr,
               BLOCK_N: tl.constexpr, D: tl.constexpr,
               KBITS: tl.constexpr, VBITS: tl.constexpr, VSYM: tl.constexpr, NOUT: tl.constexpr,
               CDT: tl.constexpr, EXP_TRICK: tl.constexpr, PREC: tl.constexpr):
    """One tile of the packed body: key scales folded into q, value scales into p.

    Tile ``tb`` covers key slots ``[tb * BLOCK_N, (tb + 1) * BLOCK_N)`` of one key group; the
    first ``OFF`` slots are phantoms (the sinks' share of the first group) and are masked.
    """
    tok = tb * BLOCK_N + tl.arange(0, BLOCK_N) - OFF
    real = tok >= 0
    grp = (tb * BLOCK_N) // GK
    kb = tl.load(kc_base + tok[:, None] * kc_st + tl.arange(0, D * KBITS // 8)[None, :],
                 mask=real[:, None], other=0)
    s = _body_scores(qv0, qv1, qv2, qv3, kb, ks_base + grp * ks_sg, kz_base + grp * ks_sg, MR, BLOCK_N,
                     D, KBITS, CDT, EXP_TRICK, PREC)
    if NOUT > 0:  # slots count the first group's phantoms, as the outlier slots do
        slot = (tb * BLOCK_N) % GK + tl.arange(0, BLOCK_N)
        s = _outlier_scores(s, qv0, qv1, qv2, qv3, oi_base + grp * o_sg, od_base + grp * o_sg, slot, D,
                            KBITS, NOUT, BLOCK_N, CDT, PREC)
    ok = _key_ok(real, pos0 + tok, mask_base, limit, SW, HAS_MASK, IS_CAUSAL, SLIDE)
    p, alpha, m_i, l_i = _softmax_step(s, ok, m_i, l_i, cap2, SOFTCAP)
    vs = tl.load(vs_base + tok[None, :] * vs_st + gsel[:, None], mask=real[None, :], other=0.0)
    vs = vs.to(tl.float32)
    pv = (p * vs).to(CDT)  # [MR, BLOCK_N]: row (m, g) carries value group g's scales
    if VSYM:  # symmetric values: the zero is implied by the scale
        vz = vs * (-((1 << VBITS) - 1) / 2)
    else:
        vz = tl.load(vz_base + tok[None, :] * vs_st + gsel[:, None], mask=real[None, :], other=0.0)
        vz = vz.to(tl.float32)
    vb = tl.load(vc_base + tok[:, None] * vc_st + tl.arange(0, D * VBITS // 8)[None, :],
                 mask=real[:, None], other=0)
    acc0 = tl.dot(pv, _part(vb, 0, VBITS, CDT, EXP_TRICK), acc0 * alpha[:, None], input_precision=PREC)
    if VBITS <= 4:
        acc1 = tl.dot(pv, _part(vb, 1, VBITS, CDT, EXP_TRICK), acc1 * alpha[:, None], input_precision=PREC)
    if VBITS == 2:
        acc2 = tl.dot(pv, _part(vb, 2, VBITS, CDT, EXP_TRICK), acc2 * alpha[:, None], input_precision=PREC)
        acc3 = tl.dot(pv, _part(vb, 3, VBITS, CDT, EXP_TRICK), acc3 * alpha[:, None], input_precision=PREC)
    zacc = zacc * alpha + tl.sum(p * vz, 1)
    return acc0, acc1, acc2, acc3, zacc, m_i, l_i


@triton.jit
def _store_part(acc, I: tl.constexpr, l_o, out_ptr, po_ptr, out_row, part_row, R, rows,
                D: tl.constexpr, PV: tl.constexpr, BLOCK_M: tl.constexpr, NG: tl.constexpr,
                GV: tl.constexpr, SINGLE_SPLIT: tl.constexpr):
    """Store channels [I*PV, (I+1)*PV): each reads the row of its value group."""
    cols = I * PV + tl.arange(0, PV)
    onehot = (cols // GV)[None, :] == tl.arange(0, NG)[:, None]  # [NG, PV]
    o = tl.sum(tl.where(onehot[None, :, :], tl.reshape(acc, (BLOCK_M, NG, PV)), 0.0), 1)
    if SINGLE_SPLIT:
        o = o / tl.where(l_o > 0, l_o, 1.0)[:, None]  # fully masked rows: acc = 0 -> 0
        tl.store(out_ptr + out_row[:, None] * D + cols[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=(rows < R)[:, None])
    else:
        tl.store(po_ptr + part_row[:, None] * D + cols[None, :], o)


@triton.jit
def _sink_logit2(sl_ptr, bh, rows, R, Hkv, Lq):
    """Learned sink logit (base 2) of each query row of KV head ``bh % Hkv``."""
    head = (bh % Hkv) * (R // Lq) + rows // Lq  # rows are (query head in the group, query)
    return tl.load(sl_ptr + head, mask=rows < R, other=float("-inf"))


@triton.jit
def _store(acc0, acc1, acc2, acc3, m_i, l_i, out_ptr, po_ptr, pm_ptr, pl_ptr, sl_ptr, bh, split, pid_m, R,
           R_PAD, SPLITS, Hkv, Lq, D: tl.constexpr, BLOCK_M: tl.constexpr, NG: tl.constexpr,
           GV: tl.constexpr, VBITS: tl.constexpr, SINGLE_SPLIT: tl.constexpr, SINKL: tl.constexpr):
    """Write the output (one split) or this split's (acc, m, l); m and l agree across repeats.

    With SINKL (one split), each row's learned sink logit joins its softmax denominator.
    """
    m_o = tl.max(tl.reshape(m_i, (BLOCK_M, NG)), 1)
    l_o = tl.max(tl.reshape(l_i, (BLOCK_M, NG)), 1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if SINKL and SINGLE_SPLIT:
        l_o += tl.exp2(_sink_logit2(sl_ptr, bh, rows, R, Hkv, Lq) - m_o)  # overflow -> inf -> output 0
    out_row = bh * R + rows
    part_row = (bh * SPLITS + split) * R_PAD + rows
    PV: tl.constexpr = D * VBITS // 8
    _store_part(acc0, 0, l_o, out_ptr, po_ptr, out_row, part_row, R, rows, D, PV, BLOCK_M, NG, GV, SINGLE_SPLIT)
    if VBITS <= 4:
        _store_part(acc1, 1, l_o, out_ptr, po_ptr, out_row, part_row, R, rows, D, PV, BLOCK_M, NG, GV,
                    SINGLE_SPLIT)
    if VBITS == 2:
        _store_part(acc2, 2, l_o, out_ptr, po_ptr, out_row, part_row, R, rows, D, PV, BLOCK_M, NG, GV,
                    SINGLE_SPLIT)
        _store_part(acc3, 3, l_o, out_ptr, po_ptr, out_row, part_row, R, rows, D, PV, BLOCK_M, NG, GV,
                    SINGLE_SPLIT)
    if not SINGLE_SPLIT:
        tl.store(pm_ptr + part_row, m_o)
        tl.store(pl_ptr + part_row, l_o)
