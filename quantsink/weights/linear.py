"""``QuantLinear``: a Linear layer with packed integer weights and fp16 outlier input channels.

Buffers (all saved in the checkpoint under these names):

- ``weight_packed`` int32 ``[out, ceil(n_q * bits / 32)]``: codes of the ``n_q = in - k``
  quantized input channels, in ascending channel order, packed as described in
  :mod:`quantsink.weights.pack` (code ``i`` at bits ``bits*(i % (32//bits))`` of word
  ``i // (32//bits)``);
- ``weight_scale`` fp16 ``[out, ceil(n_q / group_size)]`` and ``weight_zero_point`` uint8 of
  the same shape: value = ``(code - zero_point) * scale``; groups run over the quantized
  channels in storage order, the last group may be partial (symmetric grids store 2**(bits-1));
- ``weight_shape`` int64 ``[2]`` = ``[out, in]``;
- ``outlier_idx`` int64 ``[k]`` (ascending) and ``outlier_weight`` fp16 ``[out, k]``: the input
  channels kept in floating point and their weight columns.

The forward never holds a dense weight: the kernel is chosen once per device
(:mod:`quantsink.weights.backend`: on the CPU quantsink's W4A32 kernel over these very
buffers on every ISA level (AVX-512, AVX2, portable C++), or torch's int4pack kernel in bf16
where the C++ extension is not available; a Triton W4A16 kernel on
CUDA; else the torch reference of :mod:`quantsink.weights.qmatmul`, which dequantizes tile by
tile on every call).
"""
from __future__ import annotations

import torch
from torch import nn

from quantsink.weights.backend import Plan, build_plan
from quantsink.weights.outliers import split_columns
from quantsink.weights.pack import pack_codes, packed_width, unpack_codes
from quantsink.weights.rtn import dequantize_codes, n_groups


class QuantLinear(nn.Module):
    """Packed ``bits``-bit group-quantized Linear with ``n_outliers`` fp16 input channels.

    The first forward on a device (or :meth:`prepare`) picks the kernel and derives what it
    needs from the buffers; :attr:`kernel` names it.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 n_outliers: int = 0, bias: bool = False, device: torch.device | str | None = None
                 ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.n_outliers = bits, group_size, n_outliers
        n_q = in_features - n_outliers
        g = n_groups(n_q, group_size)
        kw = dict(device=device)
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_width(n_q, bits),
                                                          dtype=torch.int32, **kw))
        self.register_buffer("weight_scale", torch.ones(out_features, g, dtype=torch.float16, **kw))
        self.register_buffer("weight_zero_point", torch.zeros(out_features, g, dtype=torch.uint8, **kw))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features],
                                                          dtype=torch.int64, device=device))
        self.register_buffer("outlier_idx", torch.zeros(n_outliers, dtype=torch.int64, **kw))
        self.register_buffer("outlier_weight", torch.zeros(out_features, n_outliers,
                                                           dtype=torch.float16, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None
        self._plan: Plan | None = None

    @classmethod
    def from_quantized(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       outlier_idx: torch.Tensor, outlier_weight: torch.Tensor, bits: int,
                       group_size: int, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Build from unpacked codes ``[out, n_q]``, grids ``[out, G]`` and outliers ``[out, k]``."""
        out, n_q = codes.shape
        k = outlier_idx.numel()
        layer = cls(n_q + k, out, bits, group_size, k, bias is not None)
        layer.weight_packed.copy_(pack_codes(codes, bits))
        layer.weight_scale.copy_(scale.half())
        layer.weight_zero_point.copy_(zero.to(torch.uint8))
        layer.outlier_idx.copy_(outlier_idx.long())
        layer.outlier_weight.copy_(outlier_weight.half())
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def dequantize(self) -> torch.Tensor:
        """The effective weight ``[out, in]`` in float32."""
        n_q = self.in_features - self.n_outliers
        codes = unpack_codes(self.weight_packed, self.bits, n_q)  # [out, n_q]
        wq = dequantize_codes(codes, self.weight_scale.float(), self.weight_zero_point.float(),
                              self.group_size)
        w = torch.empty(self.out_features, self.in_features, device=wq.device)
        w[:, split_columns(self.in_features, self.outlier_idx).to(wq.device)] = wq
        w[:, self.outlier_idx] = self.outlier_weight.float()
        return w

    def prepare(self, device: torch.device | str | None = None) -> str:
        """Choose and set up the kernel for ``device`` (default: the buffers'); returns its name."""
        device = torch.device(device) if device is not None else self.weight_packed.device
        if self._plan is None or not self._plan.valid(self, device):
            self._plan = None  # drop the old plan's tensors before building the new ones
            self._plan = build_plan(self, device)
        return self._plan.kind

    @property
    def kernel(self) -> str | None:
        """The path of the current plan (None before the first forward / :meth:`prepare`):
        ``cpu-w4a32[<isa level>]`` (``,scalar`` when the group size takes the scalar loop),
        ``int4pack``, ``triton`` or ``reference``."""
        return None if self._plan is None else self._plan.name

    @property
    def backend(self) -> str | None:
        """The backend of the current plan (``cpu``, ``int4pack``, ``triton``, ``reference``)."""
        return None if self._plan is None else self._plan.kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        plan = self._plan
        if torch.compiler.is_compiling():  # no validity checks inside a graph
            if plan is None:  # a graph break: the conversion runs eagerly
                plan = torch.compiler.disable(_prepare_outside_graph)(self, x.device)
            return plan.traced(x)
        if plan is None or not plan.valid(self, x.device):
            self.prepare(x.device)
            plan = self._plan
        return plan.eager(x)

    def __getstate__(self) -> dict:
        # copies and pickles drop the plan: it is derived data, and its callables are bound
        # to this instance's tensors
        return {**super().__getstate__(), "_plan": None}

    def packed_nbytes(self) -> int:
        """Bytes of everything this layer stores (codes, grids, outliers, shape)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, n_outliers={self.n_outliers}")


def _prepare_outside_graph(layer: QuantLinear, device: torch.device) -> Plan:
    """:meth:`QuantLinear.prepare` run eagerly when ``torch.compile`` meets an unprepared layer."""
    layer.prepare(device)
    return layer._plan
