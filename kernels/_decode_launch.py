"""Input checks, launch geometry and the split-K heuristic for the decode-attention kernel."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

from quantsink.errors import QuantsinkError, check
from quantsink.kv.attention_ref import decode_attention_ref
from quantsink.kv.primitives import PackedBlock

HEAD_DIMS = (64, 128, 256)
KV_BITS = (2, 4, 8)
DENSE_TILE = 16
NUM_WARPS, NUM_STAGES = 4, 2  # untuned: no GPU was available when this was written
CTAS_PER_SM = 2  # ~200 registers x 128 threads per program (ptxas, sm_90)
MAX_VALUE_GROUPS = 16  # D // Gv; more repeats of each query row than this -> torch reference
LOG2E = 1.4426950408889634
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # (triton.cdiv is a jit function: ~10 us per call from Python)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class Geometry:
    """Launch sizes derived from the inputs."""

    R: int  # query rows per KV head: g * Lq
    block_m: int  # query rows per program (each repeated NG times in the dot)
    ng: int  # value groups per head
    gv: int  # value group size (channels)
    gk: int  # key group size (tokens)
    block_n: int  # key tile of the packed body
    dense_n: int  # key tile of the fp16 sinks and window (permuted loads: keep it small)
    tiles: int  # key tiles over the three regions

    @property
    def m_blocks(self) -> int:
        return _cdiv(self.R, self.block_m)


def _contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """k/v (or scale/zero) share one stride set in the kernel: (a, b, (batch, head, token) strides)."""
    sa, sb = a.stride(), b.stride()
    if sa != sb or sa[-1] != 1:
        a, b = a.contiguous(), b.contiguous()
        sa = a.stride()
    return a, b, sa[:3]


def _require(ok: bool, message) -> None:
    """Raise with ``message()`` unless ``ok`` (the message is built only on failure: hot path)."""
    if not ok:
        raise QuantsinkError(message())


def check_inputs(q, sink_k, sink_v, body_k, body_v, win_k, win_v, key_mask, q_sink) -> None:
    """Raise :class:`QuantsinkError` naming the first input that breaks the contract."""
    _require(q.dim() == 4, lambda: f"q must be [B, Hq, Lq, D], got shape {tuple(q.shape)}")
    B, Hq, Lq, D = q.shape
    _require(q.dtype in _TL_DTYPE, lambda: f"q dtype {q.dtype} not supported; allowed: fp16, bf16, fp32")
    Hkv = sink_k.shape[1] if sink_k.dim() == 4 else -1
    dev = q.device
    for name, x in (("sink_k", sink_k), ("sink_v", sink_v), ("win_k", win_k), ("win_v", win_v)):
        shape = x.shape
        _require(len(shape) == 4 and shape[0] == B and shape[1] == Hkv and shape[3] == D,
                 lambda: f"{name} must be [B={B}, Hkv, tokens, D={D}], got {tuple(x.shape)}")
        _require(x.is_floating_point() and x.device == dev,
                 lambda: f"{name} must be a float tensor on {dev}, got {x.dtype} on {x.device}")
    _require(sink_k.shape == sink_v.shape and win_k.shape == win_v.shape,
             lambda: "sink_k/sink_v and win_k/win_v must have equal shapes")
    _require(Hkv > 0 and Hq % Hkv == 0, lambda: f"query heads {Hq} must be a multiple of KV heads {Hkv}")
    _require((body_k is None) == (body_v is None), lambda: "body_k and body_v must both be given or both None")
    T = 0 if body_k is None else _check_body(body_k, body_v, B, Hkv, D, dev)
    if key_mask is not None:
        S = sink_k.shape[2] + T + win_k.shape[2]
        _require(tuple(key_mask.shape) == (B, S),
                 lambda: f"key_mask must be [B={B}, S={S}], got {tuple(key_mask.shape)}")
    if q_sink is not None:
        _require(q_sink.shape == q.shape and q_sink.dtype == q.dtype,
                 lambda: f"q_sink must match q {tuple(q.shape)} {q.dtype}, got {tuple(q_sink.shape)} {q_sink.dtype}")


def _check_body(bk: PackedBlock, bv: PackedBlock, B: int, Hkv: int, D: int, device) -> int:
    """Check the packed body and return its token count."""
    T, gk, gv = bk.num_tokens, bk.group_size, bv.group_size
    _require(bk.axis == "token" and bv.axis == "channel",
             lambda: f"body_k must be per-channel keys (axis 'token'), body_v per-token values (axis "
                     f"'channel'); got {bk.axis!r}, {bv.axis!r}")
    for name, blk in (("body_k", bk), ("body_v", bv)):
        _require(blk.bits in KV_BITS, lambda: f"{name}.bits={blk.bits} not supported; allowed: {KV_BITS}")
        shape = (B, Hkv, T, D * blk.bits // 8)
        c = blk.codes
        _require(c.dtype == torch.uint8 and c.shape == shape and c.device == device,
                 lambda: f"{name}.codes must be uint8 {shape} on {device}, got {c.dtype} {tuple(c.shape)} "
                         f"on {c.device}")
    off = bk.offset
    _require(0 <= off < gk and (off + T) % gk == 0,
             lambda: f"body tokens {T} + key offset {off} must be a multiple of the key group size {gk}")
    _require(D % gv == 0, lambda: f"head_dim {D} must be a multiple of the value group size {gv}")
    ks, vs = (B, Hkv, (off + T) // gk, D), (B, Hkv, T, D // gv)
    _require(bk.scale.shape == ks and bk.zero.shape == ks, lambda: f"body_k scale/zero must be {ks}")
    if bk.outlier_idx is not None:
        n_out = bk.outlier_idx.shape[3] if bk.outlier_idx.dim() == 5 else -1
        os_ = (*ks[:3], n_out, D)
        _require(n_out > 0 and bk.outlier_idx.shape == os_ and bk.outlier_idx.dtype in (torch.uint8, torch.int16)
                 and bk.outlier_delta is not None and bk.outlier_delta.shape == os_,
                 lambda: f"body_k outlier_idx (uint8 or int16) and outlier_delta must be {os_}")
    _require(bk.zero is not None, lambda: "body_k must store its zero (symmetric keys are not supported)")
    _require(bv.scale.shape == vs and (bv.zero is None or bv.zero.shape == vs),
             lambda: f"body_v scale/zero must be {vs}")
    return T


def unsupported(body_k: PackedBlock | None, body_v: PackedBlock | None, D: int) -> str | None:
    """Why valid inputs fall back to the torch reference, or None when the kernel covers them."""
    if D not in HEAD_DIMS:  # tl.arange over the head needs a power of two
        return f"head_dim {D} is not one of the kernel's {HEAD_DIMS}"
    if body_k is None or body_k.num_tokens == 0:
        return None
    if body_k.group_size % 16:
        return f"key group size {body_k.group_size} is not a multiple of 16"
    if D // body_v.group_size > MAX_VALUE_GROUPS:
        return f"value group size {body_v.group_size} gives more than {MAX_VALUE_GROUPS} groups per head"
    return None


def geometry(q: torch.Tensor, S0: int, body_k: PackedBlock | None, body_v: PackedBlock | None,
             W: int, Hkv: int) -> Geometry:
    """Tile sizes: key tiles inside one key group; query rows x value groups >= 16 for tl.dot."""
    _, Hq, Lq, D = q.shape
    R = Hq // Hkv * Lq
    if body_k is None:
        gk, gv, T, block_n = 64, D, 0, 64
    else:
        gk, gv = body_k.group_size, body_v.group_size
        T = body_k.offset + body_k.num_tokens  # key slots, the first group's phantoms included
        block_n = min(64, gk & -gk)  # largest power of two dividing the key group
    ng = D // gv
    block_m = max(min(_pow2(R), max(1, 64 // ng)), max(1, 16 // ng))
    dense_n = DENSE_TILE
    tiles = _cdiv(S0, dense_n) + T // block_n + _cdiv(W, dense_n)
    return Geometry(R, block_m, ng, gv, gk, block_n, dense_n, tiles)


def pick_splits(geo: Geometry, programs: int, device: torch.device) -> int:
    """Split-K: about one full wave of programs (2 per SM), at least 4 key tiles each (untuned)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = (CTAS_PER_SM * sms) // max(programs, 1)
    return max(1, min(want, _cdiv(geo.tiles, 4), 128))


@dataclass
class Extras:
    """Attention variants: learned sink logits, sliding window, softcap (see the reference)."""

    sink_logits: torch.Tensor | None = None
    sliding_window: int | None = None
    softcap: float | None = None

    def check(self, q: torch.Tensor) -> None:
        Hq = q.shape[1]
        sl = self.sink_logits
        _require(sl is None or (sl.shape == (Hq,) and sl.is_floating_point() and sl.device == q.device),
                 lambda: f"sink_logits must be a float [{Hq}] tensor on {q.device}, got "
                         f"{None if sl is None else (tuple(sl.shape), sl.dtype, str(sl.device))}")
        sw = self.sliding_window
        _require(sw is None or (isinstance(sw, int) and sw >= 1),
                 lambda: f"sliding_window must be an int >= 1 or None, got {sw!r}")
        _require(self.softcap is None or self.softcap > 0,
                 lambda: f"softcap must be > 0 or None, got {self.softcap!r}")


def launch(kernel, reduce_kernel, interpret: bool, q, sink_k, sink_v, body_k, body_v, win_k, win_v,
           scale: float, key_mask=None, q_sink=None, num_splits: int | None = None, sink_logits=None,
           sliding_window=None, softcap=None) -> torch.Tensor:
    """Check, pick the geometry and run the split-K kernel (+ reduce); see ``sink_decode_attention``."""
    if q.device.type != "cuda" and not interpret:
        raise QuantsinkError(f"the triton backend needs CUDA tensors or TRITON_INTERPRET=1 set before "
                             f"triton is imported; got {q.device} tensors (use backend='torch')")
    check_inputs(q, sink_k, sink_v, body_k, body_v, win_k, win_v, key_mask, q_sink)
    extras = Extras(sink_logits, sliding_window, softcap)
    extras.check(q)
    if body_k is not None and body_k.num_tokens == 0:
        body_k = body_v = None
    D = q.shape[3]
    if unsupported(body_k, body_v, D) is not None:
        return decode_attention_ref(q, sink_k, sink_v, body_k, body_v, win_k, win_v, scale, key_mask, q_sink,
                                    sink_logits=sink_logits, sliding_window=sliding_window, softcap=softcap)
    check(not (interpret and torch.bfloat16 in (q.dtype, sink_k.dtype, win_k.dtype)),
          "bf16 does not run under TRITON_INTERPRET=1; use fp16/fp32 on CPU or a CUDA device")
    B, Hkv, S0, W = q.shape[0], sink_k.shape[1], sink_k.shape[2], win_k.shape[2]
    T = 0 if body_k is None else body_k.num_tokens
    if S0 + T + W == 0:
        return torch.zeros_like(q)
    geo = geometry(q, S0, body_k, body_v, W, Hkv)
    splits = num_splits or pick_splits(geo, B * Hkv * geo.m_blocks, q.device)
    splits = _cdiv(geo.tiles, _cdiv(geo.tiles, max(1, min(splits, geo.tiles))))
    return _run(kernel, reduce_kernel, q, sink_k, sink_v, body_k, body_v, win_k, win_v, scale,
                key_mask, q_sink, geo, splits, extras)


def _body_args(q: torch.Tensor, body_k: PackedBlock | None, body_v: PackedBlock | None) -> list:
    """Pointers and strides of the packed body (dummies when there is none)."""
    if body_k is None:
        return [q, 0, 0, 0, q, q, 0, 0, 0] * 2 + [q, q, 0, 0, 0]
    kc, vc = _contig(body_k.codes), _contig(body_v.codes)
    ks, kz, ks_st = _pair(body_k.scale, body_k.zero)
    vs, vz, vs_st = _pair(body_v.scale, body_v.scale if body_v.zero is None else body_v.zero)
    out = [q, q, 0, 0, 0]
    if body_k.outlier_idx is not None:
        oi, od = body_k.outlier_idx.contiguous(), body_k.outlier_delta.contiguous()
        out = [oi, od, *oi.stride()[:3]]
    return [kc, *kc.stride()[:3], ks, kz, *ks_st, vc, *vc.stride()[:3], vs, vz, *vs_st, *out]


def _region(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list:
    """k/v pointers and (batch, head, token) strides of one fp16 region."""
    if k.numel() == 0:
        return [q, q, 0, 0, 0]
    k, v, st = _pair(k, v)
    return [k, v, *st]


def _run(kernel, reduce_kernel, q, sink_k, sink_v, body_k, body_v, win_k, win_v, scale, key_mask,
         q_sink, geo: Geometry, splits: int, extras: Extras) -> torch.Tensor:
    B, Hq, Lq, D = q.shape
    Hkv, S0, W = sink_k.shape[1], sink_k.shape[2], win_k.shape[2]
    T = 0 if body_k is None else body_k.num_tokens
    q = q.contiguous()
    qs = q if q_sink is None else q_sink.contiguous()
    out = torch.empty_like(q)
    r_pad = geo.m_blocks * geo.block_m
    po = pm = pl = out  # unused with one split
    if splits > 1:  # per-split unnormalized acc, running max and sum for the reduce
        po = torch.empty((B * Hkv, splits, r_pad, D), device=q.device, dtype=torch.float32)
        pm = torch.empty((B * Hkv, splits, r_pad), device=q.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
    mask = q if key_mask is None else _contig(key_mask.bool()).view(torch.uint8)
    body = _body_args(q, body_k, body_v)
    kbits = 4 if body_k is None else body_k.bits
    vbits = 4 if body_v is None else body_v.bits
    cdt = _TL_DTYPE[q.dtype]
    sl = pm if extras.sink_logits is None else (extras.sink_logits.float() * LOG2E).contiguous()
    sw = extras.sliding_window or 0
    cap2 = 1.0 if extras.softcap is None else extras.softcap * LOG2E
    kernel[(B * Hkv, splits, geo.m_blocks)](
        q, qs, out, po, pm, pl, mask, 0 if key_mask is None else mask.stride(0),
        *_region(q, sink_k, sink_v), *_region(q, win_k, win_v), *body, sl,
        Hkv, geo.R, r_pad, Lq, S0, T, 0 if body_k is None else body_k.offset, W, geo.gk, splits, sw,
        scale * LOG2E, cap2,
        D=D, BLOCK_M=geo.block_m, NG=geo.ng, GV=geo.gv, BLOCK_N=geo.block_n, DENSE_N=geo.dense_n, KBITS=kbits,
        VBITS=vbits, VSYM=body_v is not None and body_v.zero is None,
        NOUT=0 if body_k is None or body_k.outlier_idx is None else body_k.outlier_idx.shape[3],
        HAS_BODY=body_k is not None,
        HAS_MASK=key_mask is not None,
        IS_CAUSAL=Lq > 1, SINGLE_SPLIT=splits == 1, CDT=cdt, EXP_TRICK=q.dtype == torch.float16,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", HILO=q.dtype != torch.float32,
        SLIDE=extras.sliding_window is not None, SOFTCAP=extras.softcap is not None,
        SINKL=extras.sink_logits is not None, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if splits > 1:
        rb = 16
        reduce_kernel[(B * Hkv, _cdiv(geo.R, rb))](
            out, po, pm, pl, sl, geo.R, r_pad, splits, Hkv, Lq, D=D, RB=rb,
            SPLITS_P2=_pow2(splits), SINKL=extras.sink_logits is not None, num_warps=4)
    return out
