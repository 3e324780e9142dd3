"""Launchers of the CUDA C++ RMSNorm / LayerNorm kernels (csrc/norm.cu, norm_ops.cpp).

``norm_fwd`` / ``norm_bwd`` have the contract of the Triton launchers in
mmfast.kernels.norm (same arguments, same outputs), so one autograd function serves both
backends. They allocate the outputs (NaN-poisoned under the tests) and call the ops
``torch.ops.mmfast_cuda.norm_fwd`` / ``norm_bwd``, which write into them.

If the library cannot be loaded (no compiler, failed build: see mmfast.cuda.build, which
logs it once), they run the Triton launchers instead; from then on dispatch no longer
picks the ``cuda`` backend, since it reports the failure as its reason.
"""

from __future__ import annotations

import torch

from mmfast.cuda import build
from mmfast.kernels._launch import empty

# Mirrors kNormMaxCols in csrc/norm.h: at most 16 elements a thread, 512 threads a row.
MAX_HIDDEN = 8192


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def norm_fwd(x, weight, bias, residual, eps: float, is_rms: bool):
    """Returns (y, residual_out, mean, rstd) like mmfast.kernels.norm.norm_fwd."""
    if not build.load(x.device):
        from mmfast.kernels.norm import norm_fwd as triton_norm_fwd

        return triton_norm_fwd(x, weight, bias, residual, eps, is_rms)
    N = x.shape[-1]
    x2 = _rows_2d(x)
    M = x2.shape[0]
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = empty(x.shape if residual is not None else (0,), dtype=x.dtype, device=x.device)
    mean = empty((M,) if not is_rms else (0,), dtype=torch.float32, device=x.device)
    rstd = empty((M,), dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return y, res_out, mean, rstd
    torch.ops.mmfast_cuda.norm_fwd(
        x2, _rows_2d(residual) if residual is not None else None, weight, bias,
        _rows_2d(y), _rows_2d(res_out) if residual is not None else res_out, mean, rstd, eps, is_rms,
    )
    return y, res_out, mean, rstd


def norm_bwd(dy, h, weight, has_bias: bool, mean, rstd, dres_out, is_rms: bool):
    """Returns (dx, dweight, dbias) like mmfast.kernels.norm.norm_bwd (float32 dweight, dbias)."""
    if not build.load(h.device):
        from mmfast.kernels.norm import norm_bwd as triton_norm_bwd

        return triton_norm_bwd(dy, h, weight, has_bias, mean, rstd, dres_out, is_rms)
    N = h.shape[-1]
    dx = empty(h.shape, dtype=h.dtype, device=h.device)
    dw = empty((N,) if weight is not None else (0,), dtype=torch.float32, device=h.device)
    db = empty((N,) if has_bias else (0,), dtype=torch.float32, device=h.device)
    if N == 0:
        return dx, dw, db
    h2 = _rows_2d(h)
    # With no rows the op zeroes dw and db (sums over nothing) and launches no kernel.
    torch.ops.mmfast_cuda.norm_bwd(
        _rows_2d(dy), h2, weight, mean, rstd, _rows_2d(dres_out) if dres_out is not None else None,
        _rows_2d(dx), dw, db, is_rms,
    )
    return dx, dw, db


def register_fakes() -> None:
    """Fake implementations of the C++ ops, for torch.compile; called once they are loaded.

    They write into their arguments and return nothing, so the fakes have nothing to do.
    """
    for name in ("mmfast_cuda::norm_fwd", "mmfast_cuda::norm_bwd"):
        torch.library.register_fake(name)(lambda *args, **kwargs: None)
