"""Pointwise activations and gated (GLU-style) activations, forward and backward, each
one elementwise pass over memory.

Plain, for x of any shape:

    gelu(x)                      x/2 * (1 + erf(x / sqrt(2)))
    gelu(x, approximate="tanh")  x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    quick_gelu(x)                x * sigmoid(1.702 x)            (CLIP's QuickGELU)

Gated, for gate, up [..., N]:

    swiglu(gate, up)             silu(gate) * up                 (LLaMA/Qwen MLPs)
    geglu(gate, up)              gelu(gate) * up                 (approximate= as gelu)

or, with ``up=None``, for one tensor [..., 2N] cut into halves (no copy of either):

    gate_first=True   gate = x[..., :N], up = x[..., N:]   fused ``gate_up_proj`` weights
                      (vLLM's MergedColumnParallelLinear, Phi-3, Liger-Kernel)
    gate_first=False  up = x[..., :N], gate = x[..., N:]   diffusers' GEGLU and SwiGLU
                      (``hidden_states, gate = proj(x).chunk(2, -1)``)

The gradient of the one tensor comes back as one [..., 2N] tensor from the same pass.
Activations are computed in float32 (float64 for float64 inputs) and rounded once to the
input dtype. The backward pass recomputes the activation from the saved input(s) instead
of saving it.

Backends: ``triton`` (fp16, bf16, fp32; CUDA, or CPU under TRITON_INTERPRET=1), ``native``
(fp16, bf16, fp32: PyTorch's own ``F.gelu`` / ``F.silu`` in the input dtype, as Hugging
Face's and diffusers' activation modules compute them: the path where no kernel of ours
runs, e.g. a CPU), ``torch`` (the reference below, the tests' oracle; any floating dtype
and device).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.dispatch import Backend, Call, op_family

KINDS = ("gelu", "gelu_tanh", "quick_gelu", "silu")

# ---- reference -------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def activation_math(x: Tensor, kind: str) -> Tensor:
    """The activation in plain torch, in ``x``'s own dtype (differentiable)."""
    if kind == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if kind == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    if kind == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if kind == "silu":
        return x * torch.sigmoid(x)
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def activation_reference(x: Tensor, kind: str) -> Tensor:
    """act(x), computed in float32 (float64 for float64) and rounded once."""
    return activation_math(x.to(_compute_dtype(x.dtype)), kind).to(x.dtype)


def split_halves(x: Tensor, gate_first: bool) -> tuple[Tensor, Tensor]:
    """(gate, up): the two halves of ``x`` [..., 2N] in the given convention."""
    first, second = x.chunk(2, dim=-1)
    return (first, second) if gate_first else (second, first)


def gated_reference(gate: Tensor, up: Tensor | None, kind: str, gate_first: bool = True) -> Tensor:
    """act(gate) * up, computed in float32 (float64 for float64) and rounded once.
    With ``up=None``, ``gate`` holds both halves (see :func:`split_halves`)."""
    if up is None:
        gate, up = split_halves(gate, gate_first)
    compute = _compute_dtype(gate.dtype)
    return (activation_math(gate.to(compute), kind) * up.to(compute)).to(gate.dtype)


# ---- custom ops (opaque to torch.compile, traced through their fake impls) ---------


@torch.library.custom_op("mmfast::act_fwd", mutates_args=())
def _act_fwd_op(x: Tensor, kind: str) -> Tensor:
    from mmfast.kernels.activation import act_fwd

    return act_fwd(x, kind)


@_act_fwd_op.register_fake
def _(x, kind):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("mmfast::act_bwd", mutates_args=())
def _act_bwd_op(dy: Tensor, x: Tensor, kind: str) -> Tensor:
    from mmfast.kernels.activation import act_bwd

    return act_bwd(dy, x, kind)


@_act_bwd_op.register_fake
def _(dy, x, kind):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("mmfast::gated_fwd", mutates_args=())
def _gated_fwd_op(gate: Tensor, up: Tensor, kind: str) -> Tensor:
    from mmfast.kernels.activation import gated_fwd

    return gated_fwd(gate, up, kind)


@_gated_fwd_op.register_fake
def _(gate, up, kind):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("mmfast::gated_bwd", mutates_args=())
def _gated_bwd_op(dout: Tensor, gate: Tensor, up: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    from mmfast.kernels.activation import gated_bwd

    return gated_bwd(dout, gate, up, kind)


@_gated_bwd_op.register_fake
def _(dout, gate, up, kind):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


@torch.library.custom_op("mmfast::gated_split_fwd", mutates_args=())
def _gated_split_fwd_op(x: Tensor, kind: str, gate_first: bool) -> Tensor:
    from mmfast.kernels.activation import gated_split_fwd

    return gated_split_fwd(x, kind, gate_first)


@_gated_split_fwd_op.register_fake
def _(x, kind, gate_first):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("mmfast::gated_split_bwd", mutates_args=())
def _gated_split_bwd_op(dout: Tensor, x: Tensor, kind: str, gate_first: bool) -> Tensor:
    from mmfast.kernels.activation import gated_split_bwd

    return gated_split_bwd(dout, x, kind, gate_first)


@_gated_split_bwd_op.register_fake
def _(dout, x, kind, gate_first):
    return x.new_empty(x.shape)


# ---- autograd --------------------------------------------------------------------


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.numel() <= 1 else t.contiguous()


class ActivationFunction(torch.autograd.Function):
    """y = act(x); saves x, recomputes act'(x) in backward."""

    @staticmethod
    def forward(ctx, x, kind):
        x = x.contiguous()
        ctx.save_for_backward(x)
        ctx.kind = kind
        return torch.ops.mmfast.act_fwd(x, kind)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return torch.ops.mmfast.act_bwd(dy.contiguous(), x, ctx.kind), None


class GatedFunction(torch.autograd.Function):
    """out = act(gate) * up from two tensors; saves both."""

    @staticmethod
    def forward(ctx, gate, up, kind):
        gate, up = _unit_last(gate), _unit_last(up)
        ctx.save_for_backward(gate, up)
        ctx.kind = kind
        return torch.ops.mmfast.gated_fwd(gate, up, kind)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup = torch.ops.mmfast.gated_bwd(_unit_last(dout), gate, up, ctx.kind)
        return dgate, dup, None


class GatedSplitFunction(torch.autograd.Function):
    """out = act(gate) * up from the halves of one tensor; its gradient is one tensor."""

    @staticmethod
    def forward(ctx, x, kind, gate_first):
        x = x.contiguous()
        ctx.save_for_backward(x)
        ctx.kind, ctx.gate_first = kind, gate_first
        return torch.ops.mmfast.gated_split_fwd(x, kind, gate_first)

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        dx = torch.ops.mmfast.gated_split_bwd(_unit_last(dout), x, ctx.kind, ctx.gate_first)
        return dx, None, None


# ---- backends --------------------------------------------------------------------
# One run signature for the family: (x, up, kind, gated, gate_first).


def _run_triton(x, up, kind, gated, gate_first):
    if not gated:
        return ActivationFunction.apply(x, kind)
    if up is None:
        return GatedSplitFunction.apply(x, kind, gate_first)
    return GatedFunction.apply(x, up, kind)


def _native(x: Tensor, kind: str) -> Tensor:
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)  # transformers' QuickGELUActivation, op for op
    return F.silu(x)


def _run_native(x, up, kind, gated, gate_first):
    if not gated:
        return _native(x, kind)
    if up is None:
        x, up = split_halves(x, gate_first)
    return _native(x, kind) * up


def _run_torch(x, up, kind, gated, gate_first):
    if not gated:
        return activation_reference(x, kind)
    return gated_reference(x, up, kind, gate_first)


ACTIVATION = op_family("activation")
ACTIVATION.register(
    Backend("triton", _run_triton, triton=True, dtypes=(torch.float16, torch.bfloat16, torch.float32))
)
ACTIVATION.register(Backend("native", _run_native, dtypes=(torch.float16, torch.bfloat16, torch.float32)))
ACTIVATION.register(Backend("torch", _run_torch))


# ---- public functions ------------------------------------------------------------


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")


def _gelu_kind(approximate) -> str:
    if approximate == "none":
        return "gelu"
    if approximate == "tanh":
        return "gelu_tanh"
    raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")


def _plain(x, kind, backend):
    _check_tensor("x", x)
    call = Call(device=x.device, dtype=x.dtype)
    return ACTIVATION.select(call, backend).run(x, None, kind, False, True)


def _gated(gate, up, kind, gate_first, backend):
    _check_tensor("gate", gate)
    if not isinstance(gate_first, bool):
        raise TypeError(f"gate_first: expected a bool, got {type(gate_first).__name__}")
    if up is None:
        if gate.dim() == 0 or gate.shape[-1] % 2:
            raise ValueError(
                "gate: with up=None, expected a last dim of even size 2N holding gate and up, "
                f"got shape {tuple(gate.shape)}"
            )
    else:
        _check_tensor("up", up)
        if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
            raise ValueError(
                f"up: expected shape {tuple(gate.shape)}, dtype {gate.dtype} and device {gate.device} "
                f"(those of gate), got {tuple(up.shape)}, {up.dtype}, {up.device}"
            )
        if gate.dim() == 0:
            raise ValueError("gate: expected at least one dimension, got a 0-d tensor")
    call = Call(device=gate.device, dtype=gate.dtype)
    return ACTIVATION.select(call, backend).run(gate, up, kind, True, gate_first)


def gelu(x, approximate="none", *, backend=None):
    """GELU, exact (erf) or ``approximate="tanh"``, as ``torch.nn.functional.gelu``.

    Example::

        >>> mmfast.ops.gelu(torch.randn(2, 5, 64), approximate="tanh").shape
        torch.Size([2, 5, 64])
    """
    return _plain(x, _gelu_kind(approximate), backend)


def quick_gelu(x, *, backend=None):
    """QuickGELU of CLIP: ``x * sigmoid(1.702 * x)``.

    Example::

        >>> mmfast.ops.quick_gelu(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 64])
    """
    return _plain(x, "quick_gelu", backend)


def swiglu(gate, up=None, *, gate_first=True, backend=None):
    """``silu(gate) * up``; with ``up=None``, ``gate`` is one [..., 2N] tensor holding both
    halves (``gate_first``: which half is the gate, see the module docstring).

    Example::

        >>> gate, up = torch.randn(4, 3420), torch.randn(4, 3420)
        >>> mmfast.ops.swiglu(gate, up).shape
        torch.Size([4, 3420])
        >>> mmfast.ops.swiglu(torch.randn(4, 6840)).shape      # fused gate_up projection
        torch.Size([4, 3420])
    """
    return _gated(gate, up, "silu", gate_first, backend)


def geglu(gate, up=None, *, approximate="none", gate_first=True, backend=None):
    """``gelu(gate) * up``; with ``up=None``, ``gate`` is one [..., 2N] tensor holding both
    halves. diffusers' GEGLU puts the gate second: pass ``gate_first=False``.

    Example::

        >>> proj = torch.randn(2, 7, 2 * 320)                  # diffusers GEGLU projection
        >>> mmfast.ops.geglu(proj, gate_first=False, approximate="tanh").shape
        torch.Size([2, 7, 320])
    """
    return _gated(gate, up, _gelu_kind(approximate), gate_first, backend)
