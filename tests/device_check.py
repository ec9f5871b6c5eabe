"""A second device on a CPU-only machine: tensors that say ``meta`` and compute on the CPU.

CI has no GPU, yet code that creates its tensors on the CPU while the weights are on CUDA
only fails there. :func:`on_other_device` wraps tensors as :class:`Elsewhere` (device ``meta``,
real CPU data inside); under :class:`DeviceCheck` every op runs on the CPU data, and an op that
mixes an ``Elsewhere`` tensor with an ordinary CPU tensor raises, as CUDA does. What CUDA itself
allows is allowed: 0-dim CPU scalars, CPU index tensors, cross-device copies and ``.to``.
Factories asked for ``device=meta`` (``torch.zeros(n, device=w.device)``) make ``Elsewhere`` tensors.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

ATEN = torch.ops.aten
_CPU_INDEX_OK = {ATEN.index.Tensor, ATEN.index_put.default, ATEN.index_put_.default,
                 ATEN._index_put_impl_.default}
_TRANSFER = {ATEN._to_copy.default, ATEN.copy_.default, ATEN.to.dtype_layout, ATEN.to.device}


class CrossDevice(RuntimeError):
    """An op mixed the weights' device with the CPU."""


class Elsewhere(torch.Tensor):
    """A tensor on the 'other' device (reported as ``meta``) holding CPU data in ``.data_cpu``."""

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> "Elsewhere":
        t = torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(), dtype=data.dtype,
                                                device=torch.device("meta"), requires_grad=False,
                                                storage_offset=data.storage_offset())
        t.data_cpu = data
        return t

    def __repr__(self) -> str:  # noqa: D105
        return f"Elsewhere({self.data_cpu!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with DeviceCheck():
            return func(*args, **(kwargs or {}))


def on_other_device(t: torch.Tensor) -> Elsewhere:
    return Elsewhere(t)


def back(t):
    """The CPU data of an ``Elsewhere`` tensor (anything else as it is)."""
    return t.data_cpu if isinstance(t, Elsewhere) else t


def _is_scalar(x: torch.Tensor) -> bool:
    return x.dim() == 0 and x.device.type == "cpu"


class DeviceCheck(TorchDispatchMode):
    """Run every op on the CPU data; raise :class:`CrossDevice` on a mixed op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        wants = "device" in kwargs and kwargs["device"] is not None and torch.device(kwargs["device"]).type == "meta"
        if wants:
            kwargs["device"] = torch.device("cpu")
        seen = {"else": wants, "cpu": []}

        def unwrap(x):
            if isinstance(x, Elsewhere):
                seen["else"] = True
                return x.data_cpu
            if isinstance(x, torch.Tensor) and not _is_scalar(x):
                seen["cpu"].append(tuple(x.shape))
            return x

        a, k = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        if seen["else"] and seen["cpu"] and func not in _CPU_INDEX_OK | _TRANSFER:
            raise CrossDevice(f"{func} mixes the weights' device with CPU tensors of shapes {seen['cpu']}")
        out = func(*a, **k)
        if not seen["else"]:
            return out
        if func in _TRANSFER and "device" in kwargs and not wants:
            return out  # .to("cpu"): a real transfer back
        return tree_map(lambda x: Elsewhere(x) if isinstance(x, torch.Tensor) else x, out)
