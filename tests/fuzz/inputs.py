"""Awkward-input helpers for the fuzz cases: random tensors from a generator, and views
that keep the values but change the layout (strided, stride 0, transposed, channels_last)."""

from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def randn(gen: torch.Generator, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def strided(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The values of ``t`` as a view with stride 2 along ``dim`` (garbage in between)."""
    dim = dim % t.dim()
    wide = torch.stack([t, torch.full_like(t, 1e4)], dim=dim + 1)
    return wide.flatten(dim, dim + 1).narrow(dim, 0, 2 * t.shape[dim])[(slice(None),) * dim + (slice(None, None, 2),)]


def broadcast(t: torch.Tensor, dim: int = 0, size: int = 4) -> torch.Tensor:
    """A stride-0 view: ``t`` (size 1 along ``dim``) expanded to ``size`` there."""
    shape = list(t.shape)
    shape[dim] = size
    return t.expand(*shape)


def stride0_vector(gen: torch.Generator, n: int, dtype=torch.float32) -> torch.Tensor:
    """[n] with stride 0: one random value repeated (an expanded LayerNorm bias)."""
    return randn(gen, 1, dtype=dtype).expand(n)


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The values of the 2-D ``t`` held column-major (strides (1, rows))."""
    return t.t().contiguous().t()


def with_nan(t: torch.Tensor, index) -> torch.Tensor:
    t = t.clone()
    t[index] = float("nan")
    return t


def with_inf(t: torch.Tensor, index) -> torch.Tensor:
    t = t.clone()
    t[index] = float("inf")
    return t


def cu(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)
