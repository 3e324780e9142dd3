"""GroupNorm, optionally fused with the SiLU that follows it in diffusion ResNet blocks.

For x: [B, C, *spatial] (any number of spatial dims, none included), G groups of
Cg = C / G consecutive channels, weight, bias: [C]:

    xhat = (x - mean_g) / sqrt(var_g + eps)    mean/var over the Cg channels x all positions
    z = xhat * weight[c] + bias[c]
    y = z  (activation=None)   or   y = z * sigmoid(z)  (activation="silu")

Statistics accumulate in float32 (float64 for float64 inputs); y has the dtype and the
memory format of x: NCHW in, NCHW out; channels_last (NHWC) in, channels_last out, with no
copy. Other strides are made contiguous first.

Backends: ``cuda`` (CUDA C++, csrc/group_norm_silu.cu: fp16, bf16, fp32 with weight and
bias of x's dtype; channels-last groups of at most 256 channels; built on first use;
taken by default only where mmfast.tuning measured it faster on the device), ``triton``
(fp16, bf16, fp32; CUDA, or CPU under TRITON_INTERPRET=1), each (batch, group) split over
several programs along the spatial extent so that a batch of 2 fills a GPU; ``native``
(fp16, bf16, fp32: PyTorch's own ``F.group_norm`` then ``F.silu`` in x's dtype, as
diffusers' blocks call them: the path where no kernel of ours runs, e.g. a CPU; weight and
bias of x's dtype); ``torch`` (the reference below, the tests' oracle; any device and
floating dtype).
No check reads device memory: every call is CUDA-graph capturable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.dispatch import Backend, Call, op_family
from mmfast.ops._checks import check_eps

ACTIVATIONS = (None, "silu")

# ---- reference -------------------------------------------------------------------


def group_norm_reference(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5,
                         activation: str | None = None) -> Tensor:
    """Plain PyTorch in float32 (float64 for float64 inputs). Differentiable."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(compute)
    b = None if bias is None else bias.to(compute)
    if x.numel() == x.shape[0] * num_groups == num_groups:
        # One value per group and a batch of one: F.group_norm refuses it (its training-mode
        # batch check), but the math is defined: x - mean = 0, so y = bias (or 0).
        xc = x.to(compute)
        y = xc - xc  # zeros that keep x (and below w, b) in the graph: their gradients are defined
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = y if w is None else y * w.reshape(shape)
        y = y if b is None else y + b.reshape(shape)
    else:
        y = F.group_norm(x.to(compute), num_groups, w, b, eps)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


# ---- custom ops (opaque to torch.compile, traced through their fake impls) ---------


# One pair per kernel set (Triton, CUDA C++); both pairs share their fakes.


def _group_norm_fwd_fake(x, weight, bias, num_groups, eps, silu):
    stats = x.shape[0] * num_groups
    return (torch.empty_like(x), x.new_empty((stats,), dtype=torch.float32),
            x.new_empty((stats,), dtype=torch.float32))


def _group_norm_bwd_fake(dy, x, weight, bias, mean, rstd, num_groups, silu):
    channels = x.shape[1]
    return (torch.empty_like(x), x.new_empty((channels,), dtype=torch.float32),
            x.new_empty((channels,), dtype=torch.float32))


@torch.library.custom_op("mmfast::group_norm_fwd", mutates_args=())
def _group_norm_fwd_op(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float,
                       silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    from mmfast.kernels.group_norm import group_norm_fwd

    return group_norm_fwd(x, weight, bias, num_groups, eps, silu)


@torch.library.custom_op("mmfast::group_norm_bwd", mutates_args=())
def _group_norm_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                       rstd: Tensor, num_groups: int, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    from mmfast.kernels.group_norm import group_norm_bwd

    return group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, silu)


# The CUDA C++ kernels build on their first call, inside the op, where torch.compile
# never looks: tracing needs only the fakes.
@torch.library.custom_op("mmfast::group_norm_fwd_cuda", mutates_args=())
def _group_norm_fwd_cuda_op(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float,
                            silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    from mmfast.cuda.group_norm import group_norm_fwd

    return group_norm_fwd(x, weight, bias, num_groups, eps, silu)


@torch.library.custom_op("mmfast::group_norm_bwd_cuda", mutates_args=())
def _group_norm_bwd_cuda_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                            rstd: Tensor, num_groups: int, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    from mmfast.cuda.group_norm import group_norm_bwd

    return group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, silu)


for _op, _fake in ((_group_norm_fwd_op, _group_norm_fwd_fake), (_group_norm_bwd_op, _group_norm_bwd_fake),
                   (_group_norm_fwd_cuda_op, _group_norm_fwd_fake),
                   (_group_norm_bwd_cuda_op, _group_norm_bwd_fake)):
    _op.register_fake(_fake)

# kernels -> (forward op, backward op)
_KERNEL_OPS = {
    "triton": ("group_norm_fwd", "group_norm_bwd"),
    "cuda": ("group_norm_fwd_cuda", "group_norm_bwd_cuda"),
}


# ---- autograd --------------------------------------------------------------------


def _memory_format(x: Tensor) -> torch.memory_format | None:
    """The dense layout the kernels take x in: NCHW-contiguous or channels-last."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def _dense(t: Tensor, like: Tensor) -> Tensor:
    """``t`` if the kernels can take it as it is, else a copy in ``like``'s layout."""
    if _memory_format(t) is not None:
        return t
    return t.contiguous(memory_format=_memory_format(like) or torch.contiguous_format)


class GroupNormFunction(torch.autograd.Function):
    """Forward and backward with the ``kernels`` of _KERNEL_OPS ("triton" or "cuda");
    weight and bias are tensors here (ones/zeros if absent)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu, kernels="triton"):
        x = _dense(x, x)
        fwd_name, ctx.bwd_name = _KERNEL_OPS[kernels]
        y, mean, rstd = getattr(torch.ops.mmfast, fwd_name)(x, weight, bias, num_groups, eps, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.silu = num_groups, silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = getattr(torch.ops.mmfast, ctx.bwd_name)(
            _dense(dy, x), x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu
        )
        dweight = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = db.to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None, None


# ---- backends --------------------------------------------------------------------


def _run_kernels(x, num_groups, weight, bias, eps, activation, kernels):
    channels = x.shape[1]
    if weight is None:
        weight = torch.ones(channels, dtype=x.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(channels, dtype=x.dtype, device=x.device)
    return GroupNormFunction.apply(x, weight, bias, num_groups, eps, activation == "silu", kernels)


def _run_triton(x, num_groups, weight, bias, eps, activation):
    return _run_kernels(x, num_groups, weight, bias, eps, activation, "triton")


def _run_cuda(x, num_groups, weight, bias, eps, activation):
    return _run_kernels(x, num_groups, weight, bias, eps, activation, "cuda")


def _cuda_limits(call: Call):
    from mmfast.cuda import build
    from mmfast.cuda.group_norm import MAX_NHWC_GROUP_CHANNELS

    if any(d != call.dtype for d in call.facts["param_dtypes"]):
        yield "weight and bias must have the dtype of x"
    if call.layout == "channels_last" and call.facts["group_channels"] > MAX_NHWC_GROUP_CHANNELS:
        yield f"channels-last groups of more than {MAX_NHWC_GROUP_CHANNELS} channels"
    reason = build.unavailable_reason(call.device)
    if reason is not None:
        yield f"CUDA C++ path unavailable: {reason}"


def _run_native(x, num_groups, weight, bias, eps, activation):
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if activation == "silu":
        y = F.silu(y)
    fmt = _memory_format(x)
    return y if fmt in (None, torch.contiguous_format) else y.contiguous(memory_format=fmt)


def _native_limits(call: Call):
    if any(d != call.dtype for d in call.facts.get("param_dtypes", ())):
        yield "weight and bias must have the dtype of x"
    if call.facts.get("one_value_per_group"):
        yield "one value per group and a batch of one (F.group_norm refuses it)"


def _run_torch(x, num_groups, weight, bias, eps, activation):
    y = group_norm_reference(x, num_groups, weight, bias, eps, activation)
    fmt = _memory_format(x)
    return y if fmt in (None, torch.contiguous_format) else y.contiguous(memory_format=fmt)


GROUP_NORM = op_family("group_norm")
GROUP_NORM.register(
    Backend("cuda", _run_cuda, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
            min_capability=(8, 0), check=_cuda_limits, measured=True)
)
GROUP_NORM.register(
    Backend("triton", _run_triton, triton=True, dtypes=(torch.float16, torch.bfloat16, torch.float32))
)
GROUP_NORM.register(
    Backend("native", _run_native, dtypes=(torch.float16, torch.bfloat16, torch.float32), check=_native_limits)
)
GROUP_NORM.register(Backend("torch", _run_torch))


# ---- public function -------------------------------------------------------------


def _check_param(name: str, p, channels: int, device: torch.device) -> torch.dtype:
    """Checks a weight or bias (not None) of x [B, channels, ...] on ``device``; returns its dtype."""
    if not isinstance(p, Tensor):
        raise TypeError(f"{name}: expected a Tensor or None, got {type(p).__name__}")
    if p.shape != (channels,):
        raise ValueError(f"{name}: expected shape ({channels},) (the channels of x), got {tuple(p.shape)}")
    dtype = p.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {dtype}")
    if p.device != device:
        raise ValueError(f"{name}: expected device {device} (that of x), got {p.device}")
    return dtype


def _check_args(x, num_groups, weight, bias, eps, activation) -> tuple[torch.dtype, ...]:
    """Checks every argument; returns the dtypes of the weight and bias given. (Each
    tensor property is read once: on a small op, these reads add up to microseconds.)"""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
    shape = x.shape
    if len(shape) < 2:
        raise ValueError(f"x: expected [B, C, *spatial], got shape {tuple(shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating dtype, got {x.dtype}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups: expected an int >= 1, got {num_groups!r}")
    channels, device = shape[1], x.device
    if channels % num_groups:
        raise ValueError(f"num_groups: {num_groups} does not divide the {channels} channels of x")
    param_dtypes = ()
    if weight is not None:
        param_dtypes = (_check_param("weight", weight, channels, device),)
    if bias is not None:
        param_dtypes += (_check_param("bias", bias, channels, device),)
    check_eps(eps)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected None or 'silu', got {activation!r}")
    return param_dtypes


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, *, backend=None):
    """GroupNorm of ``x`` [B, C, *spatial] over ``num_groups`` groups of channels, then
    ``activation`` (None or "silu"). The output keeps x's memory format.

    Example::

        >>> x = torch.randn(2, 64, 9, 7).to(memory_format=torch.channels_last)
        >>> w, b = torch.ones(64), torch.zeros(64)
        >>> y = mmfast.ops.group_norm(x, 32, w, b, eps=1e-6, activation="silu")
        >>> y.shape, y.is_contiguous(memory_format=torch.channels_last)
        (torch.Size([2, 64, 9, 7]), True)
    """
    param_dtypes = _check_args(x, num_groups, weight, bias, eps, activation)
    shape = x.shape
    spatial = math.prod(shape[2:])
    channels_last = spatial > 1 and _memory_format(x) not in (None, torch.contiguous_format)
    facts = {"channels": shape[1], "group_channels": shape[1] // num_groups, "spatial": spatial,
             "one_value_per_group": shape[0] * shape[1] * spatial == num_groups,  # and a batch of one
             "param_dtypes": param_dtypes}
    layout = "channels_last" if channels_last else "nchw"
    call = Call(device=x.device, dtype=x.dtype, layout=layout, facts=facts)
    return GROUP_NORM.select(call, backend).run(x, num_groups, weight, bias, float(eps), activation)
