"""Channel-first RMS normalisation, optionally fused with the SiLU after it: Wan's video
VAE norm (diffusers ``WanRMS_norm``), which normalises every position's channel vector.

For x: [B, C, *spatial] (video [B, C, T, H, W] or image [B, C, H, W]), weight [C],
bias [C] or None:

    z = x / max(||x[:, :, pos]||_2, 1e-12) * sqrt(C) * weight + bias    (F.normalize over dim 1)
    y = z  (activation=None)   or   y = z * sigmoid(z)  (activation="silu")

which is RMSNorm over the channels with no eps inside the root (||x|| / sqrt(C) is the
RMS). diffusers runs it as F.normalize, a cast, two products and the SiLU: five passes
over the activation; here one read and one write. Computed in float32 (float64 for
float64), y of x's dtype, contiguous.

Backends: ``triton`` (fp16, bf16, fp32; C <= 1024; CUDA, or CPU under TRITON_INTERPRET=1;
the backward recomputes through the reference: the VAE's decode is what is served),
``torch`` (the reference below; any floating dtype; differentiable in every input).
No check reads device memory.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.dispatch import Backend, Call, op_family

ACTIVATIONS = (None, "silu")
TRITON_MAX_CHANNELS = 1024  # mirrors kernels/channel_rms_norm.py MAX_C (dispatch without importing Triton)

# ---- reference -------------------------------------------------------------------


def channel_rms_norm_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                               activation: str | None = None) -> Tensor:
    """Plain PyTorch in float32 (float64 for float64 inputs). Differentiable."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (1, -1) + (1,) * (x.dim() - 2)
    z = F.normalize(x.to(compute), dim=1) * math.sqrt(x.shape[1]) * weight.to(compute).reshape(shape)
    if bias is not None:
        z = z + bias.to(compute).reshape(shape)
    if activation == "silu":
        z = F.silu(z)
    return z.to(x.dtype)


# ---- custom op (opaque to torch.compile, traced through its fake impl) -------------


@torch.library.custom_op("mmfast::channel_rms_norm_fwd", mutates_args=())
def _channel_rms_norm_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    from mmfast.kernels.channel_rms_norm import channel_rms_norm_fwd

    return channel_rms_norm_fwd(x, weight, bias, silu)


@_channel_rms_norm_fwd_op.register_fake
def _(x, weight, bias, silu):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---- autograd --------------------------------------------------------------------


class ChannelRMSNormFunction(torch.autograd.Function):
    """The Triton forward; the backward recomputes the reference from the saved inputs
    (one more read of x, only when training through the VAE)."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        ctx.save_for_backward(x, weight, bias)
        ctx.activation = activation
        return torch.ops.mmfast.channel_rms_norm_fwd(x, weight, bias, activation == "silu")

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3])]
        with torch.enable_grad():
            y = channel_rms_norm_reference(*inputs, ctx.activation)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy) if wanted else ())
        return (*(next(grads) if t is not None and t.requires_grad else None for t in inputs), None)


# ---- backends --------------------------------------------------------------------


def _triton_limits(call: Call):
    if call.facts["channels"] > TRITON_MAX_CHANNELS:
        yield f"channel count {call.facts['channels']} > {TRITON_MAX_CHANNELS} (all channels of a position in one tile)"


def _run_triton(x, weight, bias, activation):
    return ChannelRMSNormFunction.apply(x, weight, bias, activation)


CHANNEL_RMS_NORM = op_family("channel_rms_norm")
CHANNEL_RMS_NORM.register(Backend("triton", _run_triton, triton=True,
                                  dtypes=(torch.float16, torch.bfloat16, torch.float32), check=_triton_limits))
CHANNEL_RMS_NORM.register(Backend("torch", channel_rms_norm_reference))


# ---- public function -------------------------------------------------------------


def _check_param(name: str, p, x: Tensor) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(p).__name__}")
    if p.shape != (x.shape[1],):
        raise ValueError(f"{name}: expected shape ({x.shape[1]},) (the channels of x), got {tuple(p.shape)}")
    if not p.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {p.dtype}")
    if p.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (that of x), got {p.device}")


def channel_rms_norm(x, weight, bias=None, activation=None, *, backend=None):
    """RMS-normalise every position's channel vector of ``x`` [B, C, *spatial] (Wan's
    ``WanRMS_norm``), then SiLU with ``activation="silu"``. See the module docstring.

    Example::

        >>> x = torch.randn(1, 16, 3, 8, 8)                 # [B, C, T, H, W]
        >>> mmfast.ops.channel_rms_norm(x, torch.ones(16), activation="silu").shape
        torch.Size([1, 16, 3, 8, 8])
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x: expected [B, C, *spatial], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating dtype, got {x.dtype}")
    _check_param("weight", weight, x)
    if bias is not None:
        _check_param("bias", bias, x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    call = Call(device=x.device, dtype=x.dtype, facts={"channels": x.shape[1]})
    return CHANNEL_RMS_NORM.select(call, backend).run(x, weight, bias, activation)
