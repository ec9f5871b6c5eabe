"""Every C++ CPU entry point on every ISA level against its torch reference, and the level plumbing.

Levels (``avx512``, ``avx2``, ``portable``) are parameters (:mod:`cpu_levels`): the portable
path runs on every host, the others where the CPU has their features (a skip names the level
and the missing feature). W4A32 and int8 rows are held to an fp32 rounding bound of the exact
product; decode attention to the Triton kernel's fp32 tolerance. Each comparison is checked to
fail on a perturbed input (a zero point, a scale, a code), so the bounds can fail.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cpu_levels import LEVELS
from quant_layers import make_layer
from test_kernels_decode_attention import make_case

from quantsink.kernels import cpu_ext
from quantsink.kernels.cpu_decode import sink_decode_cpu
from quantsink.kv.attention import decode_attention_ref
from quantsink.kv.primitives import PackedBlock, unpack
from quantsink.weights import cpu_w4
from quantsink.weights.outliers import split_columns
from quantsink.weights.qmatmul import quant_linear_ref

REPO = Path(__file__).resolve().parents[1]
# (out, in, group, outliers): aligned, odd widths, partial last group, the shipped group sizes
# (32, 64, 128) and odd ones (16, 48), 0 / 1 / many outliers
W4_SHAPES = [(64, 128, 32, 0), (97, 200, 32, 3), (48, 136, 64, 1), (33, 70, 16, 0),
             (160, 300, 128, 20), (31, 150, 48, 5), (17, 96, 64, 16), (7, 30, 16, 2)]


def _w4(layer, x, isa):
    n_q = layer.in_features - layer.n_outliers
    return cpu_w4.w4_linear_cpu(x, cpu_w4.gather_index(layer), n_q, layer.group_size,
                                cpu_w4.layer_tensors([layer]), isa=isa)[0]


def _w4_ref(layer, x):
    keep = split_columns(layer.in_features, layer.outlier_idx)
    return quant_linear_ref(x.double(), layer.weight_packed, layer.weight_scale, layer.weight_zero_point, keep,
                            layer.outlier_idx, layer.outlier_weight, layer.bias, 4, layer.group_size)


def _w4_bound(layer, x):  # fp32 rounding of a length-`in` dot product: 2^-20 of sum |x| |w|
    b = layer.bias.abs() if layer.bias is not None else 0
    return 2.0 ** -20 * (x.double().abs() @ layer.dequantize().double().abs().T + b) + 1e-6


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("out,inp,group,k", W4_SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 5])
def test_w4_linear_every_level(isa, out, inp, group, k, rows) -> None:
    layer = make_layer(out, inp, group, k, bias=True, seed=rows + k)
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows)) * 3
    got, ref = _w4(layer, x, isa), _w4_ref(layer, x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert ((got - ref).abs() <= _w4_bound(layer, x)).all()
    layer.weight_zero_point.add_(1)  # the bound catches a zero point off by one code
    assert not ((_w4(layer, x, isa) - ref).abs() <= _w4_bound(layer, x)).all()


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4_linear_other_dtypes(isa, dtype) -> None:
    layer = make_layer(97, 200, 64, 3, bias=True)
    x = torch.randn(2, 3, 200).to(dtype)
    got, ref = _w4(layer, x, isa), _w4_ref(layer, x.float())
    assert got.shape == (2, 3, 97) and got.dtype == dtype
    assert ((got.double() - ref).abs() <= 2.0 ** -7 * ref.abs() + _w4_bound(layer, x.float())).all()


def _int8_case(m, v, h, offset, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-127, 128, (v * h + offset,), dtype=torch.int8, generator=g)
    w = base[offset:].view(v, h)  # offset: a row start that is not aligned (an mmap view)
    s = (torch.rand(v, generator=g) * 0.02 + 1e-3).half()
    return torch.randn(m, h, generator=g), w, s


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("m,v,h,offset", [(1, 300, 64, 0), (3, 257, 90, 1), (8, 100, 576, 3),
                                          (9, 33, 17, 5), (17, 70, 40, 0)])
def test_int8_rows_every_level(isa, m, v, h, offset) -> None:
    x, w, s = _int8_case(m, v, h, offset, seed=m)
    ext = cpu_ext.extension()
    got = ext.int8_rows(x, w, s, isa)
    ref = x.double() @ (w.double() * s.double()[:, None]).T
    bound = 2.0 ** -20 * (x.double().abs() @ (w.double().abs() * s.double()[:, None]).T) + 1e-7
    assert got.shape == (m, v) and got.dtype == torch.float32
    assert ((got - ref).abs() <= bound).all()
    s2 = s.clone()
    s2[v // 2] = s2[v // 2] * 1.01  # one row's scale off by 1 %
    assert not ((ext.int8_rows(x, w, s2, isa) - ref).abs() <= bound).all()


def _three_bit(block: PackedBlock) -> tuple[PackedBlock, PackedBlock]:
    """(3-bit block, the same codes as an 8-bit block) from a 4-bit key/value block: codes >> 1.

    3-bit layout (cpu_kern_tiles.h): a 2-bit plane of the low bits (D / 4 bytes), then a 1-bit
    plane of bit 2 (D / 8 bytes; byte j holds bit 2 of code j + i * D / 8 at bit i)."""
    codes = unpack(block.codes, 4) >> 1  # [B, H, T, D] in 0..7
    D = codes.shape[-1]
    low = codes & 3
    planes2 = low.unflatten(-1, (4, D // 4))
    p2 = planes2[..., 0, :] | planes2[..., 1, :] << 2 | planes2[..., 2, :] << 4 | planes2[..., 3, :] << 6
    bit2 = ((codes >> 2) & 1).unflatten(-1, (8, D // 8))
    p1 = sum(bit2[..., i, :] << i for i in range(8)).to(torch.uint8)
    three = replace(block, codes=torch.cat([p2.to(torch.uint8), p1], -1).contiguous(), bits=3)
    return three, replace(block, codes=codes.contiguous(), bits=8)


DECODE = {  # make_case kwargs: 2/4/8-bit codes, unaligned regions, GQA, masks, outlier slots
    "int4_g32_unaligned": dict(S0=3, T=64, W=37, gk=32, gv=32),
    "int2_d128": dict(D=128, S0=4, T=128, W=50, kbits=2, vbits=2),
    "int8": dict(kbits=8, vbits=8, g=3, Hkv=1),
    "k4_v2_mixed_mask": dict(kbits=4, vbits=2, W=20, key_mask=True),
    "key_offset_sym_int2": dict(S0=4, T=124, off=4, kbits=2, vbits=2, vsym=True, W=30),
    "outliers_uint8_slots": dict(S0=4, T=252, off=4, gk=128, nout=2, kbits=2, vbits=2, W=20),
    "outliers_int16_slots": dict(B=1, S0=2, T=510, off=2, gk=512, nout=1, W=9),
    "head_dim_40": dict(D=40, gk=32, gv=8, T=64, W=11, q_sink=True),
    "empty_body": dict(T=0, W=70),
}


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("name", sorted(DECODE))
def test_sink_decode_every_level(isa, name) -> None:
    args = list(make_case(**{**DECODE[name], "dtype": torch.float32}))
    if DECODE[name].get("nout"):
        assert args[3].outlier_idx.dtype == (torch.int16 if DECODE[name]["gk"] > 256 else torch.uint8)
    out, ref = sink_decode_cpu(*args, isa=isa), decode_attention_ref(*args)
    assert out.shape == ref.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max().item() <= 1e-4
    if args[3] is not None:  # some key scales off by 10 % move the output past the tolerance
        args[3] = replace(args[3], scale=args[3].scale.clone())
        args[3].scale.view(-1)[::7] *= 1.1
        assert (sink_decode_cpu(*args, isa=isa) - ref).abs().max().item() > 1e-4


@pytest.mark.parametrize("isa", LEVELS)
def test_sink_decode_three_bit_codes(isa) -> None:
    args = list(make_case(S0=3, T=128, W=21, gk=64, gv=32, dtype=torch.float32))
    (k3, k8), (v3, v8) = _three_bit(args[3]), _three_bit(args[4])
    three, eight = list(args), list(args)
    three[3:5], eight[3:5] = [k3, v3], [k8, v8]
    out, ref = sink_decode_cpu(*three, isa=isa), decode_attention_ref(*eight)
    assert (out - ref).abs().max().item() <= 1e-4
    assert (sink_decode_cpu(*eight, isa=isa) - ref).abs().max().item() <= 1e-4
    wrong = list(three)
    wrong[3] = replace(k3, codes=k3.codes ^ 1)  # one low bit of every key code flipped
    assert (sink_decode_cpu(*wrong, isa=isa) - ref).abs().max().item() > 1e-4


@pytest.mark.parametrize("isa", LEVELS)
def test_sink_decode_fp16_and_extras(isa) -> None:
    args = list(make_case(key_mask=True, T=96, gk=32))  # fp16 inputs read as stored
    extras = dict(sliding_window=60, softcap=3.0)
    out = sink_decode_cpu(*args, isa=isa, **extras)
    ref = decode_attention_ref(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                 for a in args), **extras)
    assert out.dtype == torch.float16 and (out.float() - ref).abs().max().item() <= 2e-3


@pytest.mark.parametrize("isa", LEVELS)
def test_int4pack_call_takes_the_level(isa) -> None:
    """int4pack runs aten's kernel on every level; the level argument is still checked."""
    from quantsink.weights import cpu_int4

    if cpu_int4.kernel_problem() is not None:
        pytest.skip(f"int4pack (bf16) case: {cpu_int4.kernel_problem()}")
    layer = make_layer(48, 136, 64, 1, bias=True)
    keep = split_columns(136, layer.outlier_idx)
    p = cpu_int4.convert(layer.weight_packed, layer.weight_scale, layer.weight_zero_point, keep,
                         layer.outlier_idx, layer.outlier_weight, 64, 136)
    x = torch.randn(3, 136)
    args = (x, p.packed, p.scales_zeros, p.gather_idx, p.pad, p.outlier_weight_t, layer.bias.float(), 64, 48)
    got = cpu_ext.extension().int4pack_linear(*args, isa)
    want = cpu_int4.int4pack_linear_torch(x, p.packed, p.scales_zeros, p.gather_idx, p.outlier_idx,
                                          p.outlier_weight_t, layer.bias, 64, 48, p.pad)
    assert ((got - want).abs() <= 1e-5 * want.abs() + 1e-5).all()


def test_unknown_level_is_one_clear_error() -> None:
    with pytest.raises(RuntimeError, match="unknown ISA level 'sse9'"):
        cpu_ext.extension().int8_rows(torch.ones(1, 8), torch.ones(2, 8, dtype=torch.int8),
                                      torch.ones(2).half(), "sse9")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("QUANTSINK_CPU_ISA", "QUANTSINK_CPU_HIDE_FEATURES")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**full, **env}, cwd=REPO / "tests")


FORCED = """
import torch
from quantsink.kernels import cpu_ext
from quantsink.weights import cpu_w4
from quant_layers import make_layer
from test_kernels_cpu_isa import _w4_ref, _w4_bound
r = cpu_ext.report()
layer = make_layer(97, 200, 64, 3, bias=True)
x = torch.randn(2, 200)
y = cpu_w4.w4_linear_cpu(x, cpu_w4.gather_index(layer), 197, 64, cpu_w4.layer_tensors([layer]))[0]
print(r["selected"], r["selected_why"], bool(((y - _w4_ref(layer, x)).abs() <= _w4_bound(layer, x)).all()))
"""


def test_forcing_portable_in_a_fresh_process() -> None:
    proc = _python(FORCED, QUANTSINK_CPU_ISA="portable")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "portable" and "forced by QUANTSINK_CPU_ISA" in proc.stdout
    assert proc.stdout.split()[-1] == "True"


def test_forcing_a_level_the_host_lacks_raises_one_line() -> None:
    proc = _python("from quantsink.kernels import cpu_ext; cpu_ext.extension()",
                   QUANTSINK_CPU_ISA="avx2", QUANTSINK_CPU_HIDE_FEATURES="fma")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "QUANTSINK_CPU_ISA=avx2 cannot run here" in last and "no fma" in last and "portable" in last
    proc = _python("from quantsink.kernels import cpu_ext; cpu_ext.extension()", QUANTSINK_CPU_ISA="neon")
    assert "QUANTSINK_CPU_ISA='neon' is not a CPU kernel level" in proc.stderr.strip().splitlines()[-1]


def test_hidden_features_drop_the_levels_that_need_them() -> None:
    code = "from quantsink.kernels import cpu_ext; r = cpu_ext.report(); print(r['selected'], r['runnable'])"
    proc = _python(code, QUANTSINK_CPU_HIDE_FEATURES="avx512bw")
    assert proc.returncode == 0, proc.stderr
    if cpu_ext.level_problem("avx2") is None:
        assert proc.stdout.startswith("avx2 ['avx2', 'portable']")
    else:
        assert proc.stdout.startswith("portable ['portable']")


def _objects() -> list[Path]:
    build = cpu_ext._build_dir()
    return sorted(build.glob("isa_*.o"))


def test_level_objects_export_only_their_entry_points() -> None:
    """No inline / template symbol built for a feature can be picked by the linker elsewhere:
    the only global symbols an ISA object defines are its three ``qs_<level>_*`` entry points."""
    cpu_ext.extension()
    objs = _objects()
    assert {o.stem for o in objs} >= {"isa_portable"}
    for obj in objs:
        level = obj.stem.removeprefix("isa_")
        out = subprocess.run(["nm", "--defined-only", "--extern-only", str(obj)], capture_output=True,
                             text=True, check=True).stdout
        names = sorted(line.split()[-1] for line in out.splitlines() if line.strip())
        assert names == sorted(f"qs_{level}_{e}" for e in ("int8_rows", "sink_decode", "w4_linear")), names
        weak = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
        assert not [ln for ln in weak.splitlines() if ln.split()[-2:-1] in (["W"], ["V"], ["u"])], weak
