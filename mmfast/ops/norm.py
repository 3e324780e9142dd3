"""RMSNorm and LayerNorm over the last dimension, with an optional residual added first.

For x, residual: [..., N] and weight, bias: [N]:

    h = x + residual                       (or h = x)
    rms_norm:   y = h / sqrt(mean(h^2) + eps) * weight
    layer_norm: y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias

With ``residual`` given, both functions return ``(y, h)``: ``h`` is the updated residual
stream of a pre-norm transformer block, which saves the separate add kernel and one
read of it. Statistics accumulate in float32 (float64 for float64 inputs); outputs have
the dtype of ``x``, weight and bias gradients the dtype of the parameter.

Backends: ``cuda`` (CUDA C++, csrc/norm.cu: fp16, bf16, fp32 with weight and bias of
x's dtype; N <= 8192; compute capability >= 8.0; built on first use; taken by default only
where mmfast.tuning measured it faster on the device), ``triton`` (fp16, bf16, fp32;
N <= 65536; CUDA, or CPU under TRITON_INTERPRET=1), ``native`` (fp16, bf16, fp32:
PyTorch's own fused ``F.layer_norm`` / ``F.rms_norm`` in x's dtype, as Hugging Face's and
diffusers' modules call them: the path where no kernel of ours runs, e.g. a CPU; weight
and bias of x's dtype; not LayerNorm over one element), ``torch`` (the reference below,
the tests' oracle; any device and floating dtype, float64 included).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.dispatch import Backend, Call, op_family
from mmfast.ops._checks import check_eps

# ---- reference -------------------------------------------------------------------


def norm_reference(x, weight, bias, residual, eps: float, is_rms: bool) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: returns (y, h) with h = x + residual (or x). Differentiable."""
    h = x if residual is None else x + residual
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    centred = h.to(compute)
    if not is_rms:
        centred = centred - centred.mean(-1, keepdim=True)
    y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype), h


# ---- custom ops (opaque to torch.compile, traced through their fake impls) ---------


# One pair per backend kernel set (Triton, CUDA C++); both pairs share their fakes.


def _norm_fwd_fake(x, weight, bias, residual, eps, is_rms):
    rows = math.prod(x.shape[:-1])
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape if residual is not None else (0,)),
        x.new_empty((rows,) if not is_rms else (0,), dtype=torch.float32),
        x.new_empty((rows,), dtype=torch.float32),
    )


def _norm_bwd_fake(dy, h, weight, mean, rstd, dres_out, is_rms, has_bias):
    n = h.shape[-1]
    return (
        h.new_empty(h.shape),
        h.new_empty((n,) if weight is not None else (0,), dtype=torch.float32),
        h.new_empty((n,) if has_bias else (0,), dtype=torch.float32),
    )


@torch.library.custom_op("mmfast::norm_fwd", mutates_args=())
def _norm_fwd_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    eps: float, is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from mmfast.kernels.norm import norm_fwd

    return norm_fwd(x, weight, bias, residual, eps, is_rms)


@torch.library.custom_op("mmfast::norm_bwd", mutates_args=())
def _norm_bwd_op(
    dy: Tensor, h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
    dres_out: Optional[Tensor], is_rms: bool, has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from mmfast.kernels.norm import norm_bwd

    return norm_bwd(dy, h, weight, has_bias, mean, rstd, dres_out, is_rms)


# The CUDA C++ kernels build on their first call, inside the op, where torch.compile
# never looks: tracing needs only the fakes.
@torch.library.custom_op("mmfast::norm_fwd_cuda", mutates_args=())
def _norm_fwd_cuda_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    eps: float, is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from mmfast.cuda.norm import norm_fwd

    return norm_fwd(x, weight, bias, residual, eps, is_rms)


@torch.library.custom_op("mmfast::norm_bwd_cuda", mutates_args=())
def _norm_bwd_cuda_op(
    dy: Tensor, h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
    dres_out: Optional[Tensor], is_rms: bool, has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from mmfast.cuda.norm import norm_bwd

    return norm_bwd(dy, h, weight, has_bias, mean, rstd, dres_out, is_rms)


for _op, _fake in ((_norm_fwd_op, _norm_fwd_fake), (_norm_bwd_op, _norm_bwd_fake),
                   (_norm_fwd_cuda_op, _norm_fwd_fake), (_norm_bwd_cuda_op, _norm_bwd_fake)):
    _op.register_fake(_fake)

# kernels -> (forward op, backward op)
_KERNEL_OPS = {
    "triton": ("norm_fwd", "norm_bwd"),
    "cuda": ("norm_fwd_cuda", "norm_bwd_cuda"),
}


# ---- autograd --------------------------------------------------------------------


class NormFunction(torch.autograd.Function):
    """Forward and backward with the ``kernels`` of _KERNEL_OPS ("triton" or "cuda").
    Outputs (y, h); h is empty without a residual."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, is_rms, kernels="triton"):
        x = x if x.stride(-1) == 1 else x.contiguous()
        if residual is not None and residual.stride(-1) != 1:
            residual = residual.contiguous()
        fwd_name, ctx.bwd_name = _KERNEL_OPS[kernels]
        y, res_out, mean, rstd = getattr(torch.ops.mmfast, fwd_name)(x, weight, bias, residual, eps, is_rms)
        ctx.save_for_backward(res_out if residual is not None else x, weight, mean, rstd)
        ctx.is_rms = is_rms
        ctx.has_residual = residual is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)
        return y, res_out

    @staticmethod
    def backward(ctx, dy, dres_out):
        h, weight, mean, rstd = ctx.saved_tensors
        if dy is None:  # only the residual stream was used downstream
            dy = torch.zeros_like(h)
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        if not ctx.has_residual or dres_out is None:
            dres_out = None
        elif dres_out.stride(-1) != 1:
            dres_out = dres_out.contiguous()
        dx, dw, db = getattr(torch.ops.mmfast, ctx.bwd_name)(
            dy, h, weight, mean, rstd, dres_out, ctx.is_rms, ctx.bias_dtype is not None
        )
        dweight = dw.to(weight.dtype) if weight is not None else None
        dbias = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        dresidual = dx if ctx.has_residual else None
        return dx, dweight, dbias, dresidual, None, None, None


# ---- backends --------------------------------------------------------------------


def _run_triton(x, weight, bias, residual, eps, is_rms):
    y, h = NormFunction.apply(x, weight, bias, residual, eps, is_rms)
    return y, (h if residual is not None else None)


def _triton_limits(call: Call):
    from mmfast.kernels.norm import MAX_BLOCK_N, MAX_N

    if call.facts["hidden"] > MAX_N:
        yield (f"hidden size {call.facts['hidden']} > {MAX_N}: the widest rows the kernels are compiled and checked "
               f"at (rows wider than {MAX_BLOCK_N} are walked in chunks; the backward's float32 weight-gradient "
               f"partials grow with the width)")


def _run_cuda(x, weight, bias, residual, eps, is_rms):
    y, h = NormFunction.apply(x, weight, bias, residual, eps, is_rms, "cuda")
    return y, (h if residual is not None else None)


def _cuda_limits(call: Call):
    from mmfast.cuda import build
    from mmfast.cuda.norm import MAX_HIDDEN

    if call.facts["hidden"] > MAX_HIDDEN:
        yield f"hidden size {call.facts['hidden']} > {MAX_HIDDEN} (whole rows are kept in registers)"
    if any(d != call.dtype for d in call.facts["param_dtypes"]):
        yield "weight and bias must have the dtype of x"
    reason = build.unavailable_reason(call.device)
    if reason is not None:
        yield f"CUDA C++ path unavailable: {reason}"


def _run_native(x, weight, bias, residual, eps, is_rms):
    h = x if residual is None else x + residual
    shape = h.shape[-1:]
    y = F.rms_norm(h, shape, weight, eps) if is_rms else F.layer_norm(h, shape, weight, bias, eps)
    return y, (h if residual is not None else None)


def _native_limits(call: Call):
    if any(d != call.dtype for d in call.facts.get("param_dtypes", ())):
        yield "weight and bias must have the dtype of x"
    if call.facts.get("hidden") == 1 and not call.facts.get("rms", True):
        # h - mean(h) is exactly 0: F.layer_norm's backward leaves rounding noise in a
        # gradient that is exactly 0; the reference keeps it 0
        yield "LayerNorm over 1 element (y = bias; the reference keeps the gradient of x exactly 0)"


def _run_torch(x, weight, bias, residual, eps, is_rms):
    y, h = norm_reference(x, weight, bias, residual, eps, is_rms)
    return y, (h if residual is not None else None)


NORM = op_family("norm")
NORM.register(
    Backend(
        "cuda",
        _run_cuda,
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        min_capability=(8, 0),
        check=_cuda_limits,
        measured=True,
    )
)
NORM.register(
    Backend(
        "triton",
        _run_triton,
        triton=True,
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        check=_triton_limits,
    )
)
NORM.register(
    Backend("native", _run_native, dtypes=(torch.float16, torch.bfloat16, torch.float32), check=_native_limits)
)
NORM.register(Backend("torch", _run_torch))


# ---- public functions ------------------------------------------------------------


def _check_param(name: str, p, hidden: int, device: torch.device) -> torch.dtype:
    """Checks a weight or bias (not None) of x [..., hidden] on ``device``; returns its dtype."""
    if not isinstance(p, Tensor):
        raise TypeError(f"{name}: expected a Tensor or None, got {type(p).__name__}")
    if p.shape != (hidden,):
        raise ValueError(f"{name}: expected shape ({hidden},) to match the last dim of x, got {tuple(p.shape)}")
    dtype = p.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {dtype}")
    if p.device != device:
        raise ValueError(f"{name}: expected device {device} (that of x), got {p.device}")
    return dtype


def _check_args(x, weight, bias, residual, eps) -> tuple[torch.dtype, ...]:
    """Checks every argument; returns the dtypes of the weight and bias given. (Each
    tensor property is read once: on a small op, these reads add up to microseconds.)"""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
    shape = x.shape
    if not shape:
        raise ValueError("x: expected at least one dimension, got a 0-d tensor")
    dtype = x.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"x: expected a floating dtype, got {dtype}")
    hidden, device = shape[-1], x.device
    param_dtypes = ()
    if weight is not None:
        param_dtypes = (_check_param("weight", weight, hidden, device),)
    if bias is not None:
        param_dtypes += (_check_param("bias", bias, hidden, device),)
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual: expected a Tensor or None, got {type(residual).__name__}")
        if residual.shape != shape or residual.dtype != dtype or residual.device != device:
            raise ValueError(
                f"residual: expected shape {tuple(shape)}, dtype {dtype} and device {device} "
                f"(those of x), got {tuple(residual.shape)}, {residual.dtype}, {residual.device}"
            )
    check_eps(eps)
    return param_dtypes


def _norm(x, weight, bias, residual, eps, is_rms, backend):
    param_dtypes = _check_args(x, weight, bias, residual, eps)
    call = Call(device=x.device, dtype=x.dtype,
                facts={"hidden": x.shape[-1], "param_dtypes": param_dtypes, "rms": is_rms})
    y, h = NORM.select(call, backend).run(x, weight, bias, residual, float(eps), is_rms)
    return y if residual is None else (y, h)


def rms_norm(x, weight=None, eps=1e-6, *, residual=None, backend=None):
    """RMSNorm over the last dim of ``x``; with ``residual``, returns ``(y, x + residual)``.

    Example::

        >>> x = torch.randn(2, 5, 64)
        >>> w = torch.ones(64)
        >>> mmfast.ops.rms_norm(x, w).shape
        torch.Size([2, 5, 64])
        >>> y, h = mmfast.ops.rms_norm(x, w, residual=torch.randn(2, 5, 64))
    """
    return _norm(x, weight, None, residual, eps, True, backend)


def layer_norm(x, weight=None, bias=None, eps=1e-5, *, residual=None, backend=None):
    """LayerNorm over the last dim of ``x``; with ``residual``, returns ``(y, x + residual)``.

    Example::

        >>> x = torch.randn(2, 5, 64)
        >>> w, b = torch.ones(64), torch.zeros(64)
        >>> mmfast.ops.layer_norm(x, w, b).shape
        torch.Size([2, 5, 64])
    """
    return _norm(x, weight, bias, residual, eps, False, backend)
