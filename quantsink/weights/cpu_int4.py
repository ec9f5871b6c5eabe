"""CPU int4 kernel: torch's ``_weight_int4pack_mm_for_cpu`` in bf16, fp32 outlier columns.

The aten kernel computes ``y = bf16(x_bf16 @ ((c - 8) * s + z).T)`` for codes ``c`` in 0..15
``[N, K]``, ``s, z`` bf16 ``[K / G, N]``, with fp32 accumulation and one rounding of the
output (checked against float64 in the tests). It needs ``N % 16 == 0``, ``K % G == 0`` and
``G`` in {32, 64, 128, 256}, and is fast with bf16 activations only.

A :class:`~quantsink.weights.linear.QuantLinear` stores ``(c - zp) * scale`` over its ``n_q``
kept input channels. The conversion:

- ``z = (8 - zp) * scale`` in float32, exact (a 4-bit integer times an fp16 scale), so
  ``(c - 8) * scale + z == (c - zp) * scale`` bit for bit (:func:`convert` checks it on
  every code of every group); the kernel then rounds ``scale`` and ``z`` to bf16;
- K: x's kept channels are gathered (``gather_idx``) and padded with zeros to a multiple of
  ``G`` (the padding slots gather channel 0 and are zeroed), so padding contributes 0;
- N: padded to a multiple of 16 with zero scale and zero; those outputs are sliced off.

The fp16 outlier columns are a float32 ``addmm`` on x's gathered outlier channels.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from quantsink.errors import check
from quantsink.weights.qmatmul import unpack_rows

GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class Int4Pack:
    """A QuantLinear converted for the CPU kernel (tensors live on the CPU)."""

    packed: torch.Tensor  # uint8 [N_pad, K_pad / 2], the kernel's own layout
    scales_zeros: torch.Tensor  # bf16 [K_pad / G, N_pad, 2]
    gather_idx: torch.Tensor  # int64 [K_pad + k]: kept, padding (0), outliers; empty: x as is
    pad: int  # K_pad - n_q padding slots, zeroed after the gather
    outlier_idx: torch.Tensor  # int64 [k]
    outlier_weight_t: torch.Tensor  # float32 [k, N]

    def nbytes(self) -> int:
        """Bytes held by the converted tensors."""
        ts = (self.packed, self.scales_zeros, self.gather_idx, self.outlier_weight_t)
        return sum(t.numel() * t.element_size() for t in ts)


@functools.cache
def kernel_problem() -> str | None:
    """Why this host cannot run the kernel, or None (probed once per process)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT" or \
            not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no fast bf16 (oneDNN reports no bf16 support)"
    cpu = torch.device("cpu")  # explicit: this may first run under transformers' meta device
    codes = torch.arange(16 * 64, dtype=torch.int32, device=cpu).reshape(16, 64) % 16  # [N, K]
    sz = torch.stack([torch.full((2, 16), 0.5, device=cpu), torch.full((2, 16), -1.0, device=cpu)],
                     -1).bfloat16()
    x = torch.eye(64, dtype=torch.bfloat16, device=cpu)[:3]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), 32, sz)
    want = ((codes[:, :3].T.float() - 8) * 0.5 - 1.0)  # [3, N]
    if not torch.equal(y.float(), want):
        return "torch's int4pack kernel failed the self-check ((c - 8) * s + z)"
    return None


def layer_problem(bits: int, group_size: int) -> str | None:
    """Why a layer cannot use the kernel, or None."""
    if bits != 4:
        return f"{bits}-bit weights (the kernel takes 4)"
    if group_size not in GROUP_SIZES:
        return f"group_size {group_size} (the kernel takes {list(GROUP_SIZES)})"
    return kernel_problem()


def _grid(scale: torch.Tensor, zero: torch.Tensor, n_pad: int) -> torch.Tensor:
    """bf16 ``[G, n_pad, 2]`` of ``(scale, (8 - zero) * scale)``; checks the conversion."""
    s = scale.float()  # [N, G]
    z = (8 - zero.float()) * s
    c = torch.arange(16, dtype=torch.float32, device=s.device)[:, None, None]  # every code value
    check(torch.equal((c - 8) * s + z, (c - zero.float()) * s),
          "the int4pack grid conversion is not exact for these weight_scale values; allowed: "
          "fp16-representable scales (what quantize() writes)")
    out = torch.zeros(s.shape[1], n_pad, 2, device=s.device)
    out[:, : s.shape[0], 0], out[:, : s.shape[0], 1] = s.T, z.T
    return out.to(torch.bfloat16)


def convert(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
            weight_zero_point: torch.Tensor, keep_idx: torch.Tensor, outlier_idx: torch.Tensor,
            outlier_weight: torch.Tensor, group_size: int, in_features: int) -> Int4Pack:
    """Convert a QuantLinear's 4-bit buffers (on the CPU) to the kernel's form."""
    n, n_q = weight_packed.shape[0], keep_idx.numel()
    k_pad = -(-n_q // group_size) * group_size
    n_pad = -(-n // 16) * 16
    codes = torch.full((n_pad, k_pad), 8, dtype=torch.int32, device=weight_packed.device)
    codes[:n, :n_q] = unpack_rows(weight_packed, 4)[:, :n_q]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    pad = torch.zeros(k_pad - n_q, dtype=torch.long, device=keep_idx.device)  # zeroed later
    gather = torch.cat([keep_idx.long(), pad, outlier_idx.long()])  # [K_pad + k]
    if n_q == in_features == k_pad:
        gather = gather[:0]  # x is used as is
    return Int4Pack(packed, _grid(weight_scale, weight_zero_point, n_pad), gather, k_pad - n_q,
                    outlier_idx.long(), outlier_weight.float().T.contiguous())


def _extension():
    """The C++ extension's module (one call per linear), or None when it is not available."""
    from quantsink.kernels.cpu_ext import extension_or_none

    return extension_or_none()


def int4pack_linear_cpu(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor,
                        gather_idx: torch.Tensor, outlier_idx: torch.Tensor,
                        outlier_weight_t: torch.Tensor, bias: torch.Tensor | None,
                        group_size: int, out_features: int, pad: int) -> torch.Tensor:
    """``x: [..., in] -> [..., out]`` in ``x.dtype`` through the kernel (see the module docstring).

    ``gather_idx`` lists the kept channels, the ``pad`` padding slots (zeroed here) and the
    outlier channels: one gather serves both products. With the C++ extension
    (:mod:`quantsink.kernels.cpu_ext`) float32 / bf16 inputs take one call that does all of it
    (:func:`int4pack_linear_torch` is its spec, equal up to the fp32 outlier sum's order).
    """
    ext = _extension() if x.dtype in (torch.float32, torch.bfloat16) else None
    if ext is None:
        return int4pack_linear_torch(x, packed, scales_zeros, gather_idx, outlier_idx, outlier_weight_t,
                                     bias, group_size, out_features, pad)
    b = _EMPTY if bias is None else bias.detach().float()
    y = ext.int4pack_linear(x.reshape(-1, x.shape[-1]).contiguous(), packed, scales_zeros, gather_idx, pad,
                            outlier_weight_t if outlier_idx.numel() else _EMPTY, b, group_size, out_features)
    return y.reshape(*x.shape[:-1], out_features)


_EMPTY = torch.empty(0)


def int4pack_linear_torch(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor,
                          gather_idx: torch.Tensor, outlier_idx: torch.Tensor,
                          outlier_weight_t: torch.Tensor, bias: torch.Tensor | None,
                          group_size: int, out_features: int, pad: int) -> torch.Tensor:
    """:func:`int4pack_linear_cpu` in torch ops (the spec of the C++ call; any float dtype)."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, in]
    k_pad = packed.shape[1] * 2
    if gather_idx.numel():
        xg = x2.index_select(1, gather_idx)  # [M, K_pad + k]
        xq, xo = xg[:, :k_pad].to(torch.bfloat16).contiguous(), xg[:, k_pad:]  # [M, K_pad], [M, k]
        if pad:
            xq[:, k_pad - pad:].zero_()
    else:
        xq, xo = x2.to(torch.bfloat16).contiguous(), x2[:, :0]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xq, packed, group_size, scales_zeros)
    y = y[:, :out_features].float()  # [M, N]
    if outlier_idx.numel():
        y.addmm_(xo.float(), outlier_weight_t)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
