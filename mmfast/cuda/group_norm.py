"""Launchers of the CUDA C++ GroupNorm (+SiLU) kernels (csrc/group_norm_silu.cu,
group_norm_silu_ops.cpp), with the contract of the Triton launchers in
mmfast.kernels.group_norm: ``group_norm_fwd`` returns (y, mean, rstd), y in x's memory
format; ``group_norm_bwd`` returns (dx, dweight, dbias), the last two float32 [C].

The kernels take x, y, dy and dx in one layout, NCHW or channels-last, so dy is copied
into x's layout when it differs. When the library cannot be loaded they run the Triton
launchers instead (mmfast.cuda.build logs why, once).
"""

from __future__ import annotations

import math

import torch

from mmfast.cuda import build
from mmfast.kernels._launch import POISON_OUTPUTS, empty

# NHWC blocks put one pack of a group's channels on each of 256 threads (csrc/group_norm_silu.cu).
MAX_NHWC_GROUP_CHANNELS = 256


def _as_bcs(t: torch.Tensor) -> torch.Tensor:
    """[B, C, *spatial] -> a [B, C, S] view (NCHW and channels-last tensors have one)."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:])) if t.dim() != 3 else t


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)  # keeps x's memory format
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def group_norm_fwd(x, weight, bias, num_groups: int, eps: float, silu: bool):
    if not build.load(x.device):
        from mmfast.kernels.group_norm import group_norm_fwd as triton_group_norm_fwd

        return triton_group_norm_fwd(x, weight, bias, num_groups, eps, silu)
    weight, bias = weight.contiguous(), bias.contiguous()
    y = _empty_like(x)
    stats = x.shape[0] * num_groups
    mean = empty((stats,), dtype=torch.float32, device=x.device)
    rstd = empty((stats,), dtype=torch.float32, device=x.device)
    torch.ops.mmfast_cuda.group_norm_fwd(_as_bcs(x), weight, bias, _as_bcs(y), mean, rstd, num_groups, eps, silu)
    return y, mean, rstd


def group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups: int, silu: bool):
    if not build.load(x.device):
        from mmfast.kernels.group_norm import group_norm_bwd as triton_group_norm_bwd

        return triton_group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, silu)
    weight, bias = weight.contiguous(), bias.contiguous()
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)  # x's layout
    dx = _empty_like(x)
    channels = x.shape[1]
    dw = empty((channels,), dtype=torch.float32, device=x.device)
    db = empty((channels,), dtype=torch.float32, device=x.device)
    torch.ops.mmfast_cuda.group_norm_bwd(_as_bcs(dy), _as_bcs(x), weight, bias, mean, rstd, _as_bcs(dx),
                                         dw, db, num_groups, silu)
    return dx, dw, db


def register_fakes() -> None:
    """Fakes of the C++ ops for torch.compile: they write into their arguments, return nothing."""
    for name in ("mmfast_cuda::group_norm_fwd", "mmfast_cuda::group_norm_bwd"):
        torch.library.register_fake(name)(lambda *args, **kwargs: None)
