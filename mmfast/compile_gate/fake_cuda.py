"""Tensors that say they live on an H100 but hold no memory, so that the project's own
launchers can run (and pick their tiles, warps and stages as they would on a GPU) on a
machine without CUDA.

A :class:`FakeCudaTensor` is a meta tensor whose ``.device`` reports ``cuda:0``. Inside
:func:`fake_cuda`, every torch call sees plain meta tensors (a ``cuda`` device argument
becomes ``meta``) and hands its tensor results back as fake CUDA tensors, so shapes,
strides, views and storage offsets are exact while nothing is allocated or computed.
Launchers never read device memory on the host (that would sync), so nothing is lost.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

CUDA0 = torch.device("cuda", 0)
# Streaming multiprocessors of the H100 SXM the gate compiles for (launchers size their
# grids and splits by it).
H100_SMS = 132


class FakeCudaTensor(torch.Tensor):
    """A meta tensor that reports ``cuda:0`` as its device."""

    @property
    def device(self) -> torch.device:
        return CUDA0

    @property
    def is_cuda(self) -> bool:
        return True


def _to_meta(x):
    if isinstance(x, FakeCudaTensor):
        with torch._C.DisableTorchFunctionSubclass():
            return x.as_subclass(torch.Tensor)
    if isinstance(x, torch.device) and x.type == "cuda":
        return torch.device("meta")
    if isinstance(x, str) and x.startswith("cuda"):
        return "meta"
    return x


def _to_fake(x):
    if isinstance(x, torch.Tensor) and not isinstance(x, FakeCudaTensor) and x.device.type == "meta":
        with torch._C.DisableTorchFunctionSubclass():
            return x.as_subclass(FakeCudaTensor)
    return x


class _FakeCudaMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = tree_map(_to_meta, (args, kwargs or {}))
        return tree_map(_to_fake, func(*args, **kwargs))


@contextlib.contextmanager
def fake_cuda():
    """Run launchers against fake CUDA tensors on an H100-sized device (132 SMs)."""
    from mmfast.kernels import _launch

    saved = dict(_launch._sm_count)
    _launch._sm_count[CUDA0.index] = H100_SMS
    try:
        with _FakeCudaMode():
            yield
    finally:
        _launch._sm_count.clear()
        _launch._sm_count.update(saved)


def tensor(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A contiguous fake CUDA tensor (call inside :func:`fake_cuda`)."""
    return torch.empty(shape, dtype=dtype, device=CUDA0)
