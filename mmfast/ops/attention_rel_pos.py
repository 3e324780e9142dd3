"""Attention with a decomposed 2D relative-position bias (MViTv2; SAM's image encoder),
without materialising the N x N bias.

Layout (padded, as mmfast.ops.attention): q [B, Tq, H, D], k, v [B, Tk, H, D]; the keys
form a grid of KH rows and KW columns (Tk = KH * KW, key j at row j // KW, column j % KW).
The bias pieces rel_h [B, Tq, H, KH] and rel_w [B, Tq, H, KW] give each query one number
per key-grid row and one per key-grid column:

    s_ij   = scale * q_i . k_j + rel_h[i, j // KW] + rel_w[i, j % KW]
    out_i  = sum_j softmax_j(s_ij) v_j

SAM computes the pieces from q and per-layer tables (:func:`decomposed_rel_pos`):
rel_h[b, (y, x), h, ky] = q[b, (y, x), h] . R_h[y, ky], rel_w[.., kx] = q . R_w[x, kx],
O(T (KH + KW) D) work; the op's gradients flow into rel_h and rel_w, and from there (by
autograd of that product) into q and the tables. B is the batch times the windows in
SAM's windowed layers (T = 14 x 14 = 196), the batch in its global ones (T = 64 x 64 at
1024 px).

Gradients: q, k, v, rel_h, rel_w.

Backends, in priority order: ``triton`` (kernels/attention_rel_pos.py: flash-style forward
and backward, the bias added to each score tile from the pieces, dRH / dRW reduced in the
dq kernel; fp16, bf16, fp32; head dim 8..128, below 32 multiples of 8; key grid sides up
to 64; CUDA, or CPU under TRITON_INTERPRET=1), ``sdpa``
(torch.nn.functional.scaled_dot_product_attention with the bias materialised as a
[B, H, Tq, Tk] attn_mask, as Hugging Face's SamVisionSdpaAttention does: memory grows as
Tq * Tk), ``torch`` (the reference below; any floating dtype).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.dispatch import Backend, Call, op_family
from mmfast.ops._attention_checks import check_scale, triton_head_dim

# kernels/attention_rel_pos.py's limits, mirrored so that dispatch need not import Triton.
TRITON_MAX_GRID_SIDE = 64
TRITON_MAX_HEAD_DIM = 128

# ---- reference -------------------------------------------------------------------


def dense_bias(rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """The bias the kernels never form: [B, H, Tq, KH * KW], entry (i, j) =
    rel_h[i, j // KW] + rel_w[i, j % KW]. Differentiable."""
    bias = rel_h.transpose(1, 2)[..., :, None] + rel_w.transpose(1, 2)[..., None, :]
    return bias.flatten(-2)


def attention_rel_pos_reference(q, k, v, rel_h, rel_w, scale: float | None = None, upcast: bool = True):
    """Plain PyTorch with the dense bias, softmax in float32 (float64 for float64 inputs).
    Returns (out, lse [B, H, Tq]). ``upcast=False`` does the matmuls and the bias add in
    the input dtype, as Hugging Face's eager SAM attention in fp16/bf16 does (the tests'
    "eager" baseline)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.dtype == torch.float64:
        compute = torch.float64
    else:
        compute = torch.float32 if upcast else q.dtype
    softmax_dtype = torch.float64 if compute == torch.float64 else torch.float32
    qh, kh, vh = (t.transpose(1, 2).to(compute) for t in (q, k, v))
    # The bias is added in the compute dtype, as Hugging Face's eager SAM attention adds it.
    scores = (qh @ kh.transpose(-1, -2)) * scale + dense_bias(rel_h, rel_w).to(compute)
    scores = scores.to(softmax_dtype)
    probs = torch.softmax(scores, dim=-1)
    out = (probs.to(compute) @ vh).transpose(1, 2).to(q.dtype)
    return out, torch.logsumexp(scores, dim=-1)


def decomposed_rel_pos(q: Tensor, table_h: Tensor, table_w: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The bias pieces from per-query-row / per-query-column tables, as SAM's
    ``get_decomposed_rel_pos`` (before it adds them into an N x N tensor).

    ``q`` [B, QH * QW, H, D] over a query grid ``grid`` = (QH, QW); ``table_h`` [QH, KH, D]
    (what SAM's ``get_rel_pos`` returns: relative positions resized and gathered),
    ``table_w`` [QW, KW, D]. Returns rel_h [B, T, H, KH], rel_w [B, T, H, KW]:
    rel_h[b, (y, x), h, ky] = q[b, (y, x), h] . table_h[y, ky]. Differentiable.
    """
    qh, qw = grid
    batch, tokens, heads, dim = q.shape
    if qh * qw != tokens:
        raise ValueError(f"grid: {qh} x {qw} = {qh * qw} query positions, but q has {tokens} tokens")
    if table_h.dim() != 3 or table_h.shape[0] != qh or table_h.shape[2] != dim:
        raise ValueError(f"table_h: expected [{qh}, KH, {dim}] (query rows, key rows, head dim), "
                         f"got {tuple(table_h.shape)}")
    if table_w.dim() != 3 or table_w.shape[0] != qw or table_w.shape[2] != dim:
        raise ValueError(f"table_w: expected [{qw}, KW, {dim}] (query columns, key columns, head dim), "
                         f"got {tuple(table_w.shape)}")
    grid_q = q.reshape(batch, qh, qw, heads, dim)
    rel_h = torch.einsum("byxhd,ykd->byxhk", grid_q, table_h.to(q.dtype))
    rel_w = torch.einsum("byxhd,xkd->byxhk", grid_q, table_w.to(q.dtype))
    return (rel_h.reshape(batch, tokens, heads, table_h.shape[1]),
            rel_w.reshape(batch, tokens, heads, table_w.shape[1]))  # explicit sizes: a batch of 0 too


# ---- custom ops (opaque to torch.compile, traced through their fake impls) ---------


@torch.library.custom_op("mmfast::attention_rel_pos_fwd", mutates_args=())
def _attention_rel_pos_fwd_op(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor,
                              scale: float) -> tuple[Tensor, Tensor]:
    from mmfast.kernels.attention_rel_pos import attention_rel_pos_fwd

    return attention_rel_pos_fwd(q, k, v, rel_h, rel_w, scale)


@_attention_rel_pos_fwd_op.register_fake
def _(q, k, v, rel_h, rel_w, scale):
    batch, tokens, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((2, batch, heads, tokens), dtype=torch.float32)


@torch.library.custom_op("mmfast::attention_rel_pos_bwd", mutates_args=())
def _attention_rel_pos_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor,
                              out: Tensor, stats: Tensor, scale: float
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from mmfast.kernels.attention_rel_pos import attention_rel_pos_bwd

    return attention_rel_pos_bwd(dout, q, k, v, rel_h, rel_w, out, stats, scale)


@_attention_rel_pos_bwd_op.register_fake
def _(dout, q, k, v, rel_h, rel_w, out, stats, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, rel_h, rel_w))


# ---- autograd --------------------------------------------------------------------


class AttentionRelPosFunction(torch.autograd.Function):
    """Triton forward and backward; gradients for q, k, v, rel_h, rel_w."""

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, scale):
        # stats: the softmax's row max and log2 row sum (kernels/attention_rel_pos.py).
        out, stats = torch.ops.mmfast.attention_rel_pos_fwd(q, k, v, rel_h, rel_w, scale)
        ctx.save_for_backward(q, k, v, rel_h, rel_w, out, stats)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, rel_h, rel_w, out, stats = ctx.saved_tensors
        grads = torch.ops.mmfast.attention_rel_pos_bwd(dout, q, k, v, rel_h, rel_w, out, stats, ctx.scale)
        return (*grads, None)


# ---- backends --------------------------------------------------------------------


def _distinct(t: Tensor, *others: Tensor) -> Tensor:
    # Dynamo cannot trace an autograd.Function given one tensor twice (k is v); a view is
    # a distinct tensor.
    return t.view_as(t) if any(t is o for o in others) else t


def _run_triton(q, k, v, rel_h, rel_w, scale):
    k = _distinct(k, q)
    v = _distinct(v, q, k)
    rel_w = _distinct(rel_w, rel_h)
    return AttentionRelPosFunction.apply(q, k, v, rel_h, rel_w, scale)


def _run_sdpa(q, k, v, rel_h, rel_w, scale):
    bias = dense_bias(rel_h, rel_w).to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=bias, scale=scale)
    return out.transpose(1, 2)


def _run_torch(q, k, v, rel_h, rel_w, scale):
    return attention_rel_pos_reference(q, k, v, rel_h, rel_w, scale)[0]


def _triton_grid(call: Call):
    sides = call.facts["key_grid"]
    if max(sides) > TRITON_MAX_GRID_SIDE:
        yield f"key grid sides up to {TRITON_MAX_GRID_SIDE} only (got {sides[0]} x {sides[1]})"


ATTENTION_REL_POS = op_family("attention_rel_pos")
ATTENTION_REL_POS.register(
    Backend(
        "triton",
        _run_triton,
        triton=True,
        dot=True,
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        head_dims=lambda d: triton_head_dim(d) and d <= TRITON_MAX_HEAD_DIM,
        check=_triton_grid,
    )
)
ATTENTION_REL_POS.register(
    Backend("sdpa", _run_sdpa, dtypes=(torch.float16, torch.bfloat16, torch.float32))
)
ATTENTION_REL_POS.register(Backend("torch", _run_torch))


# ---- public function -------------------------------------------------------------


def _check_tensor(name: str, t, q: Tensor | None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        last = "side" if name.startswith("rel") else "D"
        raise ValueError(f"{name}: expected 4 dims [B, T, H, {last}], got shape {tuple(t.shape)}")
    if q is None:
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        return
    if t.dtype != q.dtype:
        raise TypeError(f"{name}: expected dtype {q.dtype} (that of q), got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (that of q), got {t.device}")


def _check_args(q, k, v, rel_h, rel_w, scale) -> None:
    _check_tensor("q", q, None)
    for name, t in (("k", k), ("v", v), ("rel_h", rel_h), ("rel_w", rel_w)):
        _check_tensor(name, t, q)
    batch, tokens, heads, dim = q.shape
    if dim < 1:
        raise ValueError(f"q: head dim must be at least 1, got shape {tuple(q.shape)}")
    if k.shape[0] != batch or k.shape[2] != heads or k.shape[3] != dim:
        raise ValueError(f"k: expected [{batch}, Tk, {heads}, {dim}] (batch, heads and head dim of q), "
                         f"got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (that of k), got {tuple(v.shape)}")
    for name, t in (("rel_h", rel_h), ("rel_w", rel_w)):
        if tuple(t.shape[:3]) != (batch, tokens, heads):
            raise ValueError(f"{name}: expected [{batch}, {tokens}, {heads}, side] (batch, tokens and heads of q), "
                             f"got {tuple(t.shape)}")
        if t.shape[3] < 1:
            what = "row" if name == "rel_h" else "column"
            raise ValueError(f"{name}: the key grid needs at least one {what}, got shape {tuple(t.shape)}")
    key_h, key_w = rel_h.shape[3], rel_w.shape[3]
    if key_h * key_w != k.shape[1]:
        raise ValueError(
            f"rel_w: a key grid of {key_h} rows (rel_h's last dim) x {key_w} columns (rel_w's last dim) "
            f"has {key_h * key_w} positions, but k has {k.shape[1]} tokens"
        )
    check_scale(scale)


def attention_rel_pos(q, k, v, rel_h, rel_w, *, scale=None, backend=None):
    """Softmax attention of ``q`` over ``k``, ``v`` with the decomposed relative-position
    bias ``rel_h[i, j // KW] + rel_w[i, j % KW]`` added to the scaled scores (see the module
    docstring); returns ``out`` like q. ``scale`` defaults to 1 / sqrt(D) and scales q.k
    only (not the bias), as SAM does. Checks read only shapes, dtypes and devices (no
    device sync).

    Example::

        >>> q, k, v = (torch.randn(2, 16, 3, 64) for _ in range(3))   # a 4 x 4 grid
        >>> rel_h, rel_w = mmfast.ops.decomposed_rel_pos(q, torch.randn(4, 4, 64),
        ...                                              torch.randn(4, 4, 64), (4, 4))
        >>> mmfast.ops.attention_rel_pos(q, k, v, rel_h, rel_w).shape
        torch.Size([2, 16, 3, 64])
    """
    _check_args(q, k, v, rel_h, rel_w, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    call = Call(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], layout="padded",
                facts={"key_grid": (rel_h.shape[-1], rel_w.shape[-1]), "head_dim": q.shape[-1]})
    chosen = ATTENTION_REL_POS.select(call, backend)
    return chosen.run(q, k, v, rel_h, rel_w, scale)
