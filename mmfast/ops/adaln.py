"""adaLN modulation and the gated residual of DiT / SD3 MM-DiT blocks (adaLN-Zero).

For x, y: [B, T, C] (T tokens per sample) and shift, scale, gate: [B, C] (one row per
sample, broadcast over its tokens, as diffusers' ``AdaLayerNormZero`` produces them):

    adaln_modulate(x, shift, scale) = LayerNorm(x, no affine, eps) * (1 + scale) + shift
    gated_residual(x, gate, y)      = x + gate * y

Each is one pass over the tokens instead of diffusers' three to five elementwise launches.
Statistics accumulate in float32 (float64 for float64 inputs); outputs have x's dtype,
gradients of shift/scale/gate their own dtype.

Backends: ``triton`` (fp16, bf16, fp32; C <= 16384; CUDA, or CPU under
TRITON_INTERPRET=1), ``torch`` (the references below; any device and floating dtype).
No check reads device memory: every call is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.dispatch import Backend, Call, op_family
from mmfast.ops._checks import check_eps

# ---- references ------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def adaln_modulate_reference(x, shift, scale, eps: float = 1e-6) -> Tensor:
    """Plain PyTorch in float32 (float64 for float64 inputs). Differentiable."""
    compute = _compute_dtype(x)
    xhat = F.layer_norm(x.to(compute), x.shape[-1:], eps=eps)
    return (xhat * (1 + scale.to(compute)[:, None]) + shift.to(compute)[:, None]).to(x.dtype)


def gated_residual_reference(x, gate, y) -> Tensor:
    compute = _compute_dtype(x)
    return (x.to(compute) + gate.to(compute)[:, None] * y.to(compute)).to(x.dtype)


# ---- custom ops (opaque to torch.compile, traced through their fake impls) ---------


@torch.library.custom_op("mmfast::adaln_modulate_fwd", mutates_args=())
def _adaln_fwd_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    from mmfast.kernels.adaln import adaln_fwd

    return adaln_fwd(x, shift, scale, eps)


@_adaln_fwd_op.register_fake
def _(x, shift, scale, eps):
    rows = x.shape[0] * x.shape[1]
    return (x.new_empty(x.shape), x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.float32))


@torch.library.custom_op("mmfast::adaln_modulate_bwd", mutates_args=())
def _adaln_bwd_op(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from mmfast.kernels.adaln import adaln_bwd

    return adaln_bwd(dy, x, scale, mean, rstd)


@_adaln_bwd_op.register_fake
def _(dy, x, scale, mean, rstd):
    sample = (x.shape[0], x.shape[2])
    return x.new_empty(x.shape), x.new_empty(sample, dtype=torch.float32), x.new_empty(sample, dtype=torch.float32)


@torch.library.custom_op("mmfast::gated_residual_fwd", mutates_args=())
def _gated_fwd_op(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    from mmfast.kernels.adaln import gated_residual_fwd

    return gated_residual_fwd(x, gate, y)


@_gated_fwd_op.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape)


@torch.library.custom_op("mmfast::gated_residual_bwd", mutates_args=())
def _gated_bwd_op(dout: Tensor, gate: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    from mmfast.kernels.adaln import gated_residual_bwd

    return gated_residual_bwd(dout, gate, y)


@_gated_bwd_op.register_fake
def _(dout, gate, y):
    return y.new_empty(y.shape), y.new_empty((y.shape[0], y.shape[2]), dtype=torch.float32)


# ---- autograd --------------------------------------------------------------------


class AdaLNModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        x = x.contiguous()
        shift = shift if shift.stride(-1) == 1 else shift.contiguous()
        scale = scale if scale.stride(-1) == 1 else scale.contiguous()
        y, mean, rstd = torch.ops.mmfast.adaln_modulate_fwd(x, shift, scale, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = torch.ops.mmfast.adaln_modulate_bwd(dy.contiguous(), x, scale, mean, rstd)
        return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


class GatedResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        x, y = x.contiguous(), y.contiguous()
        gate = gate if gate.stride(-1) == 1 else gate.contiguous()
        ctx.save_for_backward(gate, y)
        return torch.ops.mmfast.gated_residual_fwd(x, gate, y)

    @staticmethod
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        dout = dout.contiguous()
        dy, dgate = torch.ops.mmfast.gated_residual_bwd(dout, gate, y)
        return dout, dgate.to(gate.dtype), dy


# ---- backends --------------------------------------------------------------------


def _triton_limits(call: Call):
    from mmfast.kernels.adaln import MAX_C

    if call.facts["channels"] > MAX_C:
        yield f"channel count {call.facts['channels']} > {MAX_C} (whole rows are kept in registers)"


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

def _run_triton(op: str, *args):
    return (AdaLNModulateFunction if op == "modulate" else GatedResidualFunction).apply(*args)


def _run_torch(op: str, *args):
    return (adaln_modulate_reference if op == "modulate" else gated_residual_reference)(*args)


# One family for both ops: they share their backends and limits.
ADALN = op_family("adaln")
ADALN.register(Backend("triton", _run_triton, triton=True, dtypes=_TRITON_DTYPES, check=_triton_limits))
ADALN.register(Backend("torch", _run_torch))


# ---- public functions ------------------------------------------------------------


def _check_tokens(name: str, t, like: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if like is None:
        if t.dim() != 3:
            raise ValueError(f"{name}: expected [B, T, C], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        return
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)}, dtype {like.dtype} and device "
                         f"{like.device} (those of x), got {tuple(t.shape)}, {t.dtype}, {t.device}")


def _check_per_sample(name: str, t, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    shape = x.shape
    if t.shape != (shape[0], shape[2]):
        raise ValueError(f"{name}: expected shape [B, C] = ({shape[0]}, {shape[2]}) (one row per "
                         f"sample of x), got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (that of x), got {t.device}")


def _select(x: Tensor, backend):
    return ADALN.select(Call(device=x.device, dtype=x.dtype, facts={"channels": x.shape[-1]}), backend)


def adaln_modulate(x, shift, scale, eps=1e-6, *, backend=None):
    """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` for x [B, T, C] and
    shift, scale [B, C]; the LayerNorm has no affine parameters.

    Example::

        >>> x = torch.randn(2, 77, 64)
        >>> shift, scale = torch.randn(2, 64), torch.randn(2, 64)
        >>> mmfast.ops.adaln_modulate(x, shift, scale).shape
        torch.Size([2, 77, 64])
    """
    _check_tokens("x", x)
    _check_per_sample("shift", shift, x)
    _check_per_sample("scale", scale, x)
    check_eps(eps)
    return _select(x, backend).run("modulate", x, shift, scale, float(eps))


def gated_residual(x, gate, y, *, backend=None):
    """``x + gate[:, None] * y`` for x, y [B, T, C] and gate [B, C].

    Example::

        >>> x, y = torch.randn(2, 77, 64), torch.randn(2, 77, 64)
        >>> mmfast.ops.gated_residual(x, torch.randn(2, 64), y).shape
        torch.Size([2, 77, 64])
    """
    _check_tokens("x", x)
    _check_tokens("y", y, x)
    _check_per_sample("gate", gate, x)
    return _select(x, backend).run("gated", x, gate, y)
