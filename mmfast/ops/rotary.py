"""Rotary position embeddings (RoPE) applied to q and, in the same launch, k.

Layouts: packed ``x`` [T, H, D] with ``cos``, ``sin`` [T, R/2]; padded ``x`` [B, T, H, D]
with ``cos``, ``sin`` [T, R/2] (shared by the batch) or [B, T, R/2]. The tables hold one
angle per rotated pair, per token, so any position scheme works by building its own
tables: 1D RoPE, Qwen2-VL's 2D vision RoPE (see
:func:`mmfast.ops.vision_windows.vision_rotary_cos_sin`), M-RoPE. R = 2 * cos.shape[-1]
is the rotary dim (<= D; the last D - R elements pass through unchanged). Hugging Face's
full-width tables (the half-width ones concatenated with themselves) convert with
``cos[..., :R // 2]``.

Pair j holds (x1, x2) = (x[j], x[j + R/2]) with ``interleaved=False`` (rotate-half:
GPT-NeoX, Llama, Qwen) and (x[2j], x[2j + 1]) with ``interleaved=True`` (GPT-J):

    out1 = x1 * cos_j - x2 * sin_j,    out2 = x2 * cos_j + x1 * sin_j

computed in float32 (float64 for float64), returned in the input dtype, as Hugging Face's
``apply_rotary_pos_emb_vision`` does.

Backends: ``triton`` (fp16, bf16, fp32; CUDA, or CPU under TRITON_INTERPRET=1; no
gradient for cos/sin: the tables are constants in every model we serve, and a call
whose tables require grad goes to the reference), ``torch`` (the reference below; any
floating dtype; differentiable in every input). No check syncs the device.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast.dispatch import Backend, Call, op_family
from mmfast.ops._attention_checks import check_tensor

# ---- reference -------------------------------------------------------------------


def _broadcast_table(table: Tensor) -> Tensor:
    """[T, R/2] or [B, T, R/2] -> broadcastable against x's [.., T, H, R/2]."""
    return table.unsqueeze(-2)


def rotary_reference(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Plain PyTorch, differentiable in x, cos and sin."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    rot_dim = 2 * cos.shape[-1]
    whole = rot_dim == x.shape[-1]  # nothing passes through: no slice, no concatenation
    rot = (x if whole else x[..., :rot_dim]).to(compute)
    c, s = _broadcast_table(cos.to(compute)), _broadcast_table(sin.to(compute))
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    out = out.to(x.dtype)
    return out if whole else torch.cat([out, x[..., rot_dim:]], dim=-1)


# ---- custom op (opaque to torch.compile, traced through its fake impl) -------------


@torch.library.custom_op("mmfast::rotary", mutates_args=())
def _rotary_op(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, interleaved: bool,
               conj: bool) -> tuple[Tensor, Tensor]:
    from mmfast.kernels.rotary import rotary

    return rotary(q, k, cos, sin, interleaved, conj)


@_rotary_op.register_fake
def _(q, k, cos, sin, interleaved, conj):
    return q.new_empty(q.shape), q.new_empty(k.shape if k is not None else (0,))


# ---- autograd --------------------------------------------------------------------


def _last_dim_contiguous(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


class RotaryFunction(torch.autograd.Function):
    """Triton forward and backward (the inverse rotation). Outputs (q_out, k_out); k_out
    is an empty tensor without k. No gradient for cos/sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, interleaved):
        q, k, cos, sin = (_last_dim_contiguous(t) for t in (q, k, cos, sin))
        out_q, out_k = torch.ops.mmfast.rotary(q, k, cos, sin, interleaved, False)
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        ctx.has_k = k is not None
        ctx.set_materialize_grads(False)
        return out_q, out_k

    @staticmethod
    def backward(ctx, dout_q, dout_k):
        cos, sin = ctx.saved_tensors
        dout_k = dout_k if ctx.has_k else None

        def rotate_back(a, b):
            return torch.ops.mmfast.rotary(_last_dim_contiguous(a), _last_dim_contiguous(b), cos, sin,
                                           ctx.interleaved, True)

        if dout_q is not None and dout_k is not None:
            dq, dk = rotate_back(dout_q, dout_k)  # one launch for both
        elif dout_q is not None:
            dq, dk = rotate_back(dout_q, None)[0], None
        elif dout_k is not None:
            dq, dk = None, rotate_back(dout_k, None)[0]
        else:
            dq = dk = None
        return dq, dk, None, None, None


# ---- backends --------------------------------------------------------------------


def _distinct(t: Tensor, *others: Tensor | None) -> Tensor:
    # Dynamo cannot trace an autograd.Function given one tensor twice; a view is distinct.
    return t.view_as(t) if t is not None and any(t is o for o in others) else t


def _run_triton(q, k, cos, sin, interleaved):
    k = _distinct(k, q)
    sin = _distinct(sin, cos)
    out_q, out_k = RotaryFunction.apply(q, k, cos, sin, interleaved)
    return out_q, (out_k if k is not None else None)


def _triton_limits(call: Call):
    if call.facts["table_grad"]:
        yield "cos/sin require grad (the Triton backend gives no gradient for the tables)"


def _run_torch(q, k, cos, sin, interleaved):
    out_k = rotary_reference(k, cos, sin, interleaved) if k is not None else None
    return rotary_reference(q, cos, sin, interleaved), out_k


ROTARY = op_family("rotary")
ROTARY.register(
    Backend("triton", _run_triton, triton=True, dtypes=(torch.float16, torch.bfloat16, torch.float32),
            check=_triton_limits)
)
ROTARY.register(Backend("torch", _run_torch))


# ---- public function -------------------------------------------------------------


def _check_x(name: str, x, q: Tensor | None = None) -> None:
    check_tensor(name, x, q)
    if q is not None and (x.shape[:-2] != q.shape[:-2] or x.shape[-1] != q.shape[-1]):
        raise ValueError(
            f"{name}: expected the batch, token and head-dim sizes of q {tuple(q.shape)} (any head count), "
            f"got {tuple(x.shape)}"
        )


def _check_tables(cos, sin, q: Tensor) -> None:
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (that of q), got {t.device}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin: expected shape {tuple(cos.shape)} (that of cos), got {tuple(sin.shape)}")
    tokens = q.shape[-3]
    allowed = [(tokens,)] + ([(q.shape[0], tokens)] if q.dim() == 4 else [])
    if cos.dim() < 2 or tuple(cos.shape[:-1]) not in allowed:
        layouts = "[T, R/2]" + (" or [B, T, R/2]" if q.dim() == 4 else "")
        raise ValueError(f"cos: expected {layouts} for q of shape {tuple(q.shape)}, got {tuple(cos.shape)}")
    if not 1 <= 2 * cos.shape[-1] <= q.shape[-1]:
        raise ValueError(
            f"cos: last dim R/2 = {cos.shape[-1]} gives rotary dim {2 * cos.shape[-1]}, expected 2..{q.shape[-1]} "
            "(the head dim)"
        )


def apply_rotary(q, k, cos, sin, *, interleaved=False, backend=None):
    """Rotate ``q`` (and ``k``, when not None, in the same launch) by per-token angles.

    Returns ``(q_out, k_out)``, or ``q_out`` alone when ``k`` is None. ``k`` may have
    another head count than ``q`` (GQA). See the module docstring for the layouts.

    Example::

        >>> q, k = torch.randn(10, 4, 64), torch.randn(10, 2, 64)     # packed: 10 tokens
        >>> angles = torch.arange(10.0)[:, None] * 10000.0 ** (-torch.arange(32) / 32)
        >>> q_rot, k_rot = mmfast.ops.apply_rotary(q, k, angles.cos(), angles.sin())
        >>> q_rot.shape, k_rot.shape
        (torch.Size([10, 4, 64]), torch.Size([10, 2, 64]))
    """
    _check_x("q", q)
    if k is not None:
        _check_x("k", k, q)
    _check_tables(cos, sin, q)
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved: expected a bool, got {type(interleaved).__name__}")
    table_grad = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    call = Call(device=q.device, dtype=q.dtype, head_dim=q.shape[-1],
                layout="packed" if q.dim() == 3 else "padded", facts={"table_grad": table_grad})
    out_q, out_k = ROTARY.select(call, backend).run(q, k, cos, sin, interleaved)
    return out_q if k is None else (out_q, out_k)
