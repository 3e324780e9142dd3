"""Scaled dot-product attention over packed variable-length segments or a padded batch,
with grouped K/V heads (GQA/MQA), causal masking and sliding windows.

Layouts (Hq query heads, Hk K/V heads, Hk divides Hq; query head h reads K/V head
h // (Hq / Hk)):

    packed: q [Tq, Hq, D], k, v [Tk, Hk, D], cu_seqlens_q/k int32 [B+1]: segment b is
            tokens cu_seqlens[b] .. cu_seqlens[b+1]; lse [Hq, Tq]
    padded: q [B, Tq, Hq, D], k, v [B, Tk, Hk, D]; lse [B, Hq, Tq]

    out_i = sum_j softmax_j(scale * q_i . k_j) v_j   over the keys j query i sees,
    lse_i = log sum_j exp(scale * q_i . k_j)         (float32; differentiable)

Within a segment of lq queries and lk keys, query i sits at key position i + lk - lq
(bottom-right alignment, as flash-attn >= 2.1) and sees key j when
``i + lk - lq - left <= j <= i + lk - lq + right`` for ``window=(left, right)``, -1 meaning
unbounded on that side; ``causal=True`` sets right = 0 (as flash-attn does). A query
that sees no key (its key segment is empty, or its window holds no key) gets out = 0,
lse = -inf and contributes no gradient; the reference does the same.

Rotary: ``rotary=(cos, sin)`` gives the result (and q/k/v gradients) of
``attention(*apply_rotary(q, k, cos, sin), v)`` (rotate-half; tables [T, R/2], or
[B, T, R/2] padded, R <= D; row t for token t of q and of k, so q and k have the same
tokens). The ``triton`` and ``triton_short`` backends fuse it (tiles rotated on load; dq,
dk rotated back in the backward kernels); the op layer composes apply_rotary and
attention for every other backend, and for tables that require grad. Multi-axis
positions (FLUX's 3 axes, Qwen-VL's 2D/3D ones) are per-token tables too: each token's row
holds its axes' angles side by side.

QK norm: ``qk_norm=(q_weight, k_weight, eps)`` gives the result (and q/k/v/weight
gradients) of ``attention(*apply_rotary(rms_norm(q, q_weight, eps), rms_norm(k, k_weight,
eps), cos, sin), v)``: every head of q and k RMS-normalised over D (weights [D] or None),
then rotated. The ``triton`` backend fuses it (q tiles normalised on load; the backward
reads normalised copies and maps dq, dk through the RMSNorm backward kernel); the op layer
composes rms_norm for every other backend, and where the rotation itself is composed.

Dropout: ``dropout_p`` > 0 multiplies the softmax probabilities by a keep-mask / (1 - p)
before they weight v; lse stays that of the undropped scores. The triton, triton_short
and torch backends share one Philox mask (mmfast.ops.attention_dropout: indexed by query
row, query head and key position, so tiling and layout do not change it), drawn from a
seed tensor that each call takes from ``generator``; the kernels regenerate it in the
backward instead of storing it. sdpa and flash_attn drop with their own generator.

Device syncs (which checks read device values back to the host):
- with ``max_seqlen_q`` and ``max_seqlen_k`` given, the call reads nothing back (CUDA-graph
  capturable) on the triton, triton_short, flash_attn, flash_attn_cute, sdpa and torch
  backends: their grids and masks are sized from those ints, and every check is on
  shapes, dtypes, devices and Python values;
- without them, they are computed from cu_seqlens (one sync), and since that syncs anyway
  the values of cu_seqlens are checked too (start at 0, non-decreasing, last entry = token
  count). CPU tensors are always checked so (no sync to avoid), the given max_seqlen too;
  ``MMFAST_DEBUG_CHECKS=1`` does it on every call (one sync);
- unchecked values on a device cannot corrupt memory: the mmfast kernels (triton,
  triton_short, cuda_short) clamp cu_seqlens into [0, T] (bad values give unspecified
  rows, never an access outside the tensors), and a max_seqlen smaller than the longest
  segment, or 0, costs speed only: the kernels loop over the blocks past their grid, and
  the short-segment ones hand segments too long for their slots to the general kernel.
  The third-party flash_attn / flash_attn_cute backends keep flash-attn's contract
  (max_seqlen must bound the segments);
- the xformers backend syncs once per packed call: its BlockDiagonalMask is built from
  Python lists of segment lengths;
- dropout adds none: its seed is drawn on the device by a torch random op (graph-safe under
  CUDA-graph capture with torch's default generator; register another one with the graph).
Dispatch itself reads no device value: it decides on dtype, device, head dim, layout and
the max_seqlen ints.

Backends, in priority order (the first that can take a call runs it):
``cuda_short`` (CUDA C++, csrc/attention_short.cu: the short-segment forward on tensor
cores, fp16/bf16, head dims multiple of 8 up to 128; no backward, so never for inputs
that require grad; taken by default only where mmfast.tuning measured it faster on the
device), ``triton_short`` (kernels/attention_short.py: whole short segments per program, for
segments of at most 128 tokens, head dim 8..128; picked by max_seqlen_q/k, so the
64-token windows of Qwen2.5-VL land here), ``triton`` (kernels/attention.py, flash-style;
fp16, bf16, fp32; head dim 8..256, below 32 multiples of 8; CUDA, or CPU under
TRITON_INTERPRET=1 for both Triton backends), then the optional libraries (mmfast/ops/attention_external.py, CUDA, fp16/bf16,
no lse): ``flash_attn_cute`` (flash-attn 4, sm90+, head dims 64/96/128), ``flash_attn``
(flash-attn 2, sm80+, head dims multiple of 8 up to 256), ``xformers``
(memory_efficient_attention with a BlockDiagonalMask; no causal or windows), then
``sdpa`` (torch.nn.functional.scaled_dot_product_attention; no lse; on a CPU, where
cu_seqlens are read for free, one SDPA call per run of equal segments, GQA without copies
(mmfast.ops._sdpa_segments); elsewhere, and for what that path hands back, K/V heads are
repeated for GQA and the packed layout goes through a block-diagonal boolean [Tq, Tk] mask
built on the device, so memory grows as Tq * Tk: for modest sizes), ``torch`` (the reference
below, any floating dtype; memory B * Hq * Tq * Tk floats). The optional libraries rank
below triton until measured otherwise; a missing one is skipped with its reason, and
forcing it (``backend="xformers"``) raises NoBackendError with that reason.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.dispatch import Backend, Call, module_available, op_family
from mmfast.ops._attention_checks import check_lengths, check_qkv, check_scale, triton_head_dim
from mmfast.ops._sdpa_contained import attend_values, sdpa_contained
from mmfast.ops._sdpa_segments import attend_on_host
from mmfast.ops import attention_external as external
from mmfast.ops.attention_dropout import apply_dropout, check_dropout, draw_seed, keep_mask
from mmfast.ops.norm import rms_norm
from mmfast.ops.rotary import apply_rotary

# The short-segment Triton path (kernels/attention_short.py): its limits, mirrored here so
# that dispatch can decide without importing Triton.
SHORT_MAX_SEQLEN = 128
SHORT_MAX_HEAD_DIM = 128

# ---- reference -------------------------------------------------------------------


def _positions(cu_seqlens: Tensor | None, tokens: int, device) -> tuple[Tensor, Tensor]:
    """(segment index, position in the segment) of every token; one segment if padded."""
    index = torch.arange(tokens, device=device)
    if cu_seqlens is None:
        return torch.zeros_like(index), index
    # Segment b holds cu[b] <= t < cu[b+1]: the count of ends cu[1:] that are <= t.
    segment = torch.searchsorted(cu_seqlens[1:], index.to(cu_seqlens.dtype), right=True)
    return segment, index - cu_seqlens[segment]


def attention_mask(cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, tokens_q: int,
                   tokens_k: int, window_left: int, window_right: int, device) -> Tensor:
    """Boolean [Tq, Tk]: query token i sees key token j. Loop-free, on ``device``, no sync.

    Packed: block-diagonal over the segments; padded (cu_seqlens None): one segment.
    """
    seg_q, pos_q = _positions(cu_seqlens_q, tokens_q, device)
    seg_k, pos_k = _positions(cu_seqlens_k, tokens_k, device)
    if cu_seqlens_q is None:
        shift = torch.full_like(pos_q, tokens_k - tokens_q)
        mask = seg_q[:, None] == seg_k[None, :]
    else:
        # Tokens past the last entry belong to no segment (a bad cu_seqlens): they see
        # nothing, and no lookup leaves cu_seqlens (on CUDA that would be a device assert).
        segments = cu_seqlens_q.numel() - 1
        if segments < 1:
            return torch.zeros(tokens_q, tokens_k, dtype=torch.bool, device=device)
        seg = seg_q.clamp(max=segments - 1)
        len_q = cu_seqlens_q[seg + 1] - cu_seqlens_q[seg]
        len_k = cu_seqlens_k[seg + 1] - cu_seqlens_k[seg]
        shift = len_k - len_q
        mask = (seg_q[:, None] == seg_k[None, :]) & (seg_q < segments)[:, None]
    diag = (pos_q + shift)[:, None]  # the key position each query is aligned with
    if window_left >= 0:
        mask &= pos_k[None, :] >= diag - window_left
    if window_right >= 0:
        mask &= pos_k[None, :] <= diag + window_right
    return mask


def _heads_first(t: Tensor) -> Tensor:
    """[T, H, D] -> [H, T, D]; [B, T, H, D] -> [B, H, T, D]."""
    return t.transpose(-3, -2)


def attention_reference(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None,
                        window_left: int = -1, window_right: int = -1, scale: float | None = None,
                        upcast: bool = True, dropout_p: float = 0.0, dropout_seed: Tensor | None = None):
    """Plain PyTorch, loop-free, in float32 (float64 for float64 inputs). Returns (out, lse).

    Builds the full [.., Hq, Tq, Tk] score matrix with an explicit mask. Differentiable,
    lse included; queries that see no key get out = 0, lse = -inf and no gradient.
    ``upcast=False`` does the matmuls in the input dtype (softmax still in float32), as
    PyTorch eager attention in fp16/bf16 would: the tests' "eager" baseline, like
    flash-attn's own tests. ``dropout_p`` > 0 drops probabilities with the Triton
    kernels' own mask for ``dropout_seed`` (mmfast.ops.attention_dropout); lse is unaffected.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.dtype == torch.float64:
        compute = torch.float64
    else:
        compute = torch.float32 if upcast else q.dtype
    softmax_dtype = torch.float64 if compute == torch.float64 else torch.float32
    group = q.shape[-2] // k.shape[-2]
    qc = _heads_first(q).to(compute)
    kc = _heads_first(k).to(compute).repeat_interleave(group, dim=-3)
    vc = _heads_first(v).to(compute).repeat_interleave(group, dim=-3)
    mask = attention_mask(cu_seqlens_q, cu_seqlens_k, q.shape[-3], k.shape[-3],
                          window_left, window_right, q.device)
    sees_any = mask.any(-1, keepdim=True)
    scores = ((qc @ kc.transpose(-1, -2)) * scale).to(softmax_dtype)
    scores = scores.masked_fill(~mask, float("-inf"))
    # Rows that see nothing get constant scores, so no gradient flows from them.
    scores = torch.where(sees_any, scores, torch.zeros((), dtype=softmax_dtype, device=q.device))
    probs = torch.softmax(scores, dim=-1) * sees_any
    if dropout_p > 0:
        probs = apply_dropout(probs, keep_mask(dropout_seed, dropout_p, q, k, cu_seqlens_k), dropout_p)
    out = _heads_first(attend_values(probs.to(compute), vc, mask)).to(q.dtype)  # NaN/Inf kept in its segment
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~sees_any[..., 0], float("-inf"))
    return out, lse


# ---- custom ops (opaque to torch.compile, traced through their fake impls) ---------


def _lse_shape(q: Tensor, packed: bool) -> tuple[int, ...]:
    return (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op("mmfast::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, window_left: int, window_right: int, scale: float,
    cos: Optional[Tensor], sin: Optional[Tensor], seed: Optional[Tensor], dropout_p: float,
    q_weight: Optional[Tensor] = None, k_weight: Optional[Tensor] = None, norm_eps: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    from mmfast.kernels.attention import attention_fwd

    qk_norm = None if norm_eps is None else (q_weight, k_weight, norm_eps)
    return attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         window_left, window_right, scale, cos, sin, seed, dropout_p, qk_norm=qk_norm)


@_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right, scale,
      cos, sin, seed, dropout_p, q_weight=None, k_weight=None, norm_eps=None):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


@torch.library.custom_op("mmfast::attention_bwd", mutates_args=())
def _attention_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
    max_seqlen_k: int, window_left: int, window_right: int, scale: float,
    cos: Optional[Tensor], sin: Optional[Tensor], seed: Optional[Tensor], dropout_p: float,
    q_weight: Optional[Tensor] = None, k_weight: Optional[Tensor] = None, norm_eps: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dq_weight, dk_weight); the weight gradients float32 [D], empty [0]
    for a weight that is None or without the norm (norm_eps None)."""
    from mmfast.kernels.attention import attention_bwd

    args = (dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            window_left, window_right, scale, cos, sin, seed, dropout_p)
    if norm_eps is None:
        return (*attention_bwd(*args), q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32))
    return attention_bwd(*args, qk_norm=(q_weight, k_weight, norm_eps))


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      window_left, window_right, scale, cos, sin, seed, dropout_p, q_weight=None, k_weight=None, norm_eps=None):
    def weight_grad(w):
        return q.new_empty(w.shape if norm_eps is not None and w is not None else (0,), dtype=torch.float32)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), weight_grad(q_weight),
            weight_grad(k_weight))


@torch.library.custom_op("mmfast::attention_short_fwd", mutates_args=())
def _attention_short_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, window_left: int, window_right: int, scale: float,
    cos: Optional[Tensor], sin: Optional[Tensor], seed: Optional[Tensor], dropout_p: float,
    table_seg_stride: int,
) -> tuple[Tensor, Tensor]:
    from mmfast.kernels.attention_short import attention_short_fwd

    return attention_short_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               window_left, window_right, scale, cos, sin, table_seg_stride, seed, dropout_p)


@_attention_short_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right, scale,
      cos, sin, seed, dropout_p, table_seg_stride):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, True), dtype=torch.float32)


@torch.library.custom_op("mmfast::attention_short_bwd", mutates_args=())
def _attention_short_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, window_left: int, window_right: int, scale: float,
    cos: Optional[Tensor], sin: Optional[Tensor], seed: Optional[Tensor], dropout_p: float,
    table_seg_stride: int,
) -> tuple[Tensor, Tensor, Tensor]:
    from mmfast.kernels.attention_short import attention_short_bwd

    return attention_short_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, window_left, window_right, scale,
                               cos, sin, table_seg_stride, seed, dropout_p)


@_attention_short_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      window_left, window_right, scale, cos, sin, seed, dropout_p, table_seg_stride):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# The CUDA C++ kernel builds on its first call, inside the op, where torch.compile never
# looks: tracing needs only the fake. Forward only (see _cuda_short_limits).
@torch.library.custom_op("mmfast::attention_short_fwd_cuda", mutates_args=())
def _attention_short_fwd_cuda_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, window_left: int, window_right: int, scale: float,
) -> tuple[Tensor, Tensor]:
    from mmfast.cuda.attention import attention_short_fwd

    return attention_short_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               window_left, window_right, scale)


@_attention_short_fwd_cuda_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right, scale):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, True), dtype=torch.float32)


# ---- autograd --------------------------------------------------------------------


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(ctx, fwd_op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             window_left, window_right, scale, cos, sin, seed, dropout_p, norm=()):
    """``cos``, ``sin``: both None or both tensors (their last dim contiguous, sin with the
    strides of cos). ``seed``: the dropout seed (None when ``dropout_p`` is 0). ``norm``:
    (q_weight, k_weight, norm_eps) for ops that take them, else ()."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right, scale)
    out, lse = fwd_op(q, k, v, *args, cos, sin, seed, dropout_p, *norm)
    weights = norm[:2] if norm else ()
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, cos, sin, seed, *weights)
    ctx.args = args[2:]
    ctx.dropout_p = dropout_p
    ctx.norm_eps = norm[2:]
    ctx.set_materialize_grads(False)
    return out, lse


def _backward(ctx, bwd_op, dout, dlse):
    """(dq, dk, dv), then (dq_weight, dk_weight) when the forward had ``norm``."""
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, cos, sin, seed, *weights = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else _last_dim_contiguous(dout)
    dlse = None if dlse is None else dlse.contiguous()
    grads = bwd_op(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, *ctx.args,
                   cos, sin, seed, ctx.dropout_p, *weights, *ctx.norm_eps)
    if not weights:
        return tuple(grads[:3])
    weight_grads = tuple(None if w is None else g.to(w.dtype) for w, g in zip(weights, grads[3:]))
    return tuple(grads[:3]) + weight_grads


class AttentionFunction(torch.autograd.Function):
    """Triton forward and backward, general kernels. Outputs (out, lse); both are
    differentiable. ``cos``, ``sin``: rotary tables applied to q and k inside the kernels
    (no gradient for them), or None. ``seed``, ``dropout_p``: attention dropout (seed None
    and p 0 without). ``q_weight``, ``k_weight``, ``norm_eps``: the per-head RMSNorm of q
    and k before the rotation (norm_eps None: none; a weight None: no affine), with
    gradients for the weights."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                window_left, window_right, scale, cos, sin, seed, dropout_p, q_weight, k_weight, norm_eps):
        norm = () if norm_eps is None else (q_weight, k_weight, norm_eps)
        return _forward(ctx, torch.ops.mmfast.attention_fwd, q, k, v, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k, window_left, window_right, scale, cos, sin,
                        seed, dropout_p, norm)

    @staticmethod
    def backward(ctx, dout, dlse):
        grads = _backward(ctx, torch.ops.mmfast.attention_bwd, dout, dlse)
        dq, dk, dv = grads[:3]
        dq_weight, dk_weight = grads[3:] if len(grads) == 5 else (None, None)
        # No gradient for cu_seqlens, the ints, scale, the rotary tables, the dropout args, eps.
        return (dq, dk, dv) + (None,) * 11 + (dq_weight, dk_weight, None)


class ShortAttentionFunction(torch.autograd.Function):
    """Triton forward and backward for short packed segments (kernels/attention_short.py).
    ``cos``, ``sin``: 2-D rotary tables applied inside the kernels (no gradient for them),
    or None; ``table_seg_stride`` rebases each segment's table rows (0 for packed tables)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                window_left, window_right, scale, cos, sin, seed, dropout_p, table_seg_stride):
        ctx.table_seg_stride = table_seg_stride
        fwd_op = partial(torch.ops.mmfast.attention_short_fwd, table_seg_stride=table_seg_stride)
        return _forward(ctx, fwd_op, q, k, v, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k, window_left, window_right, scale, cos, sin,
                        seed, dropout_p)

    @staticmethod
    def backward(ctx, dout, dlse):
        bwd_op = partial(torch.ops.mmfast.attention_short_bwd, table_seg_stride=ctx.table_seg_stride)
        return _backward(ctx, bwd_op, dout, dlse) + (None,) * 12


# ---- backends --------------------------------------------------------------------


def _distinct(t: Tensor, *others: Tensor | None) -> Tensor:
    # Dynamo cannot trace an autograd.Function given one tensor twice (self-attention
    # with k is v, or one cu_seqlens for both sides); a view is a distinct tensor.
    return t.view_as(t) if t is not None and any(t is o for o in others) else t


def _run_triton_function(function, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         window_left, window_right, scale, *tables):
    k = _distinct(k, q)
    v = _distinct(v, q, k)
    cu_seqlens_k = _distinct(cu_seqlens_k, cu_seqlens_q)
    return function.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          window_left, window_right, scale, *tables)


def _run_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                window_left, window_right, scale, rotary=None, dropout_p=0.0, seed=None, qk_norm=None):
    # The kernels read both tables with the strides of cos: make them alike (tables are small).
    cos, sin = (None, None) if rotary is None else (t.contiguous() for t in rotary)
    q_weight, k_weight, eps = (None, None, None) if qk_norm is None else qk_norm
    return _run_triton_function(AttentionFunction, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                max_seqlen_q, max_seqlen_k, window_left, window_right, scale,
                                cos, _distinct(sin, cos), seed, dropout_p,
                                q_weight, _distinct(k_weight, q_weight), None if eps is None else float(eps))


def _run_triton_short(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      window_left, window_right, scale, rotary=None, dropout_p=0.0, seed=None):
    # The kernels read both tables with the strides of cos: make them alike (tables are small).
    cos, sin = (None, None) if rotary is None else (t.contiguous() for t in rotary)
    if cu_seqlens_q is not None:
        return _run_triton_function(ShortAttentionFunction, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, window_left, window_right, scale,
                                    cos, _distinct(sin, cos), seed, dropout_p, 0)
    # Padded: each batch entry is one segment of the packed layout (a view when the batch
    # and token dims merge); the reshapes stay differentiable, lse included.
    batch, tokens_q, tokens_k = q.shape[0], q.shape[1], k.shape[1]
    steps = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    table_seg_stride = 0
    if cos is not None:
        # Packed token t of entry b is token t - b * T of that entry: rebase each segment
        # onto its own table row block ([B, T, R/2]) or the shared one ([T, R/2]).
        table_seg_stride = (cos.stride(0) if cos.dim() == 3 else 0) - tokens_q * cos.stride(-2)
        cos, sin = cos.flatten(0, -2), sin.flatten(0, -2)
    out, lse = _run_triton_function(
        ShortAttentionFunction, q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
        steps * tokens_q, steps * tokens_k, tokens_q, tokens_k, window_left, window_right, scale,
        cos, _distinct(sin, cos), seed, dropout_p, table_seg_stride,
    )
    return out.unflatten(0, (batch, tokens_q)), lse.unflatten(1, (batch, tokens_q)).transpose(0, 1)


def _run_cuda_short(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    window_left, window_right, scale):
    # No autograd.Function: dispatch never gives this backend inputs that require grad.
    forward = torch.ops.mmfast.attention_short_fwd_cuda
    if cu_seqlens_q is not None:
        return forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       window_left, window_right, scale)
    # Padded: each batch entry is one segment of the packed layout, as in _run_triton_short.
    batch, tokens_q, tokens_k = q.shape[0], q.shape[1], k.shape[1]
    steps = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    out, lse = forward(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), steps * tokens_q, steps * tokens_k,
                       tokens_q, tokens_k, window_left, window_right, scale)
    return out.unflatten(0, (batch, tokens_q)), lse.unflatten(1, (batch, tokens_q)).transpose(0, 1)


def _run_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              window_left, window_right, scale, dropout_p=0.0, seed=None):
    # cu_seqlens read on the host for free (is_cpu: device.type costs ~1 us a call)
    if not torch.compiler.is_compiling() and q.is_cpu:
        out = attend_on_host(q, k, v, cu_seqlens_q, cu_seqlens_k, (window_left, window_right), scale, dropout_p)
        if out is not None:
            return out, None
    packed = cu_seqlens_q is not None
    group = q.shape[-2] // k.shape[-2]
    qh = q.transpose(-3, -2)
    kh = k.transpose(-3, -2).repeat_interleave(group, dim=-3)
    vh = v.transpose(-3, -2).repeat_interleave(group, dim=-3)
    if k.shape[-3] == 0:  # no keys: every query sees nothing (q * 0 keeps the graph: zero grads)
        return q * 0, None
    # Dropout with SDPA's own generator (torch's default one): not the Triton kernels' mask.
    if packed or window_left >= 0 or window_right >= 0:
        mask = attention_mask(cu_seqlens_q, cu_seqlens_k, q.shape[-3], k.shape[-3],
                              window_left, window_right, q.device)
        # A NaN/Inf key or value stays with the queries that see it (not the other sequences).
        out = sdpa_contained(qh, kh, vh, mask, scale, dropout_p)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, dropout_p=dropout_p)
    return out.transpose(-3, -2), None


def _run_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
               window_left, window_right, scale, dropout_p=0.0, seed=None):
    return attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, window_left, window_right, scale,
                               dropout_p=dropout_p, dropout_seed=seed)


def _no_dropout(call: Call):
    if call.facts.get("dropout_p", 0.0) > 0:
        yield "dropout_p > 0 not supported"


def _own_rng_dropout(library: str, call: Call):
    # Dropout with the library's own generator: it cannot take ours.
    if call.facts.get("dropout_p", 0.0) > 0 and call.facts.get("generator", False):
        yield f"generator= not supported with dropout ({library} draws from torch's default generator)"


def _sdpa_limits(call: Call):
    if call.facts["return_lse"]:
        yield "return_lse=True not supported (SDPA does not return the log-sum-exp)"
    yield from _own_rng_dropout("SDPA", call)


def _short_segments(call: Call):
    longest = max(call.facts["max_seqlen_q"], call.facts["max_seqlen_k"])
    if longest > SHORT_MAX_SEQLEN:
        yield (f"segments of up to {SHORT_MAX_SEQLEN} tokens only (max_seqlen_q/k: "
               f"{call.facts['max_seqlen_q']}/{call.facts['max_seqlen_k']})")


def _cuda_short_limits(call: Call):
    from mmfast.cuda import build

    if call.facts["requires_grad"]:
        yield "no backward: inputs require grad (a forward-only kernel)"
    yield from _short_segments(call)
    yield from _no_dropout(call)
    reason = build.unavailable_reason(call.device)
    if reason is not None:
        yield f"CUDA C++ path unavailable: {reason}"


def _external_limits(module: str, library: str, dropout: bool, call: Call):
    if not module_available(module):
        yield f"{library} is not installed (no module '{module}')"
    if call.facts["return_lse"]:
        yield f"return_lse=True not supported ({library} does not differentiate its lse)"
    yield from _own_rng_dropout(library, call) if dropout else _no_dropout(call)


def _xformers_limits(call: Call):
    if call.facts["return_lse"]:
        yield "return_lse=True not supported"
    if call.facts["window"] != (-1, -1):
        # Its bottom-right causal masks require every query to see a key; not wrapped.
        yield "causal and windowed attention not supported (this wrapper passes block-diagonal masks only)"
    yield from _no_dropout(call)


# Backends that rotate q and k inside their kernels (``rotary=``); every other backend
# gets them rotated by apply_rotary first (its torch reference for the torch backend).
FUSES_ROTARY = ("triton", "triton_short")
# Backends that RMS-normalise q and k inside their kernels (``qk_norm=``); every other
# backend gets them normalised by rms_norm first. triton_short is not among them: its
# kernels hold whole segments of q, k and v in registers (the Qwen2.5-VL windows already
# use all 255), and the norm is not fused there yet; it composes rms_norm, then its own
# fused rotary.
FUSES_QK_NORM = ("triton",)
# Backends whose dropout is the Philox mask of mmfast.ops.attention_dropout (reproducible
# from the seed); sdpa and flash_attn drop with their own generator.
PHILOX_DROPOUT = ("triton", "triton_short", "torch")

ATTENTION = op_family("attention")
ATTENTION.register(
    Backend(
        "cuda_short",
        _run_cuda_short,
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16),
        head_dims=lambda d: d % 8 == 0 and 8 <= d <= SHORT_MAX_HEAD_DIM,  # csrc/attention_short.h
        min_capability=(8, 0),
        check=_cuda_short_limits,
        measured=True,
    )
)
ATTENTION.register(
    Backend(
        "triton_short",
        _run_triton_short,
        triton=True,
        dot=True,
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        head_dims=lambda d: triton_head_dim(d) and d <= SHORT_MAX_HEAD_DIM,
        check=_short_segments,
    )
)
ATTENTION.register(
    Backend(
        "triton",
        _run_triton,
        triton=True,
        dot=True,
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        head_dims=lambda d: triton_head_dim(d) and d <= 256,
    )
)
ATTENTION.register(
    Backend(
        "flash_attn_cute",
        external.run_flash_attn_cute,
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16),
        head_dims=(64, 96, 128),  # what flash_attn/cute/interface.py lists as supported
        min_capability=(9, 0),
        requires=("flash_attn",),
        check=partial(_external_limits, "flash_attn.cute", "flash-attn 4", False),
    )
)
ATTENTION.register(
    Backend(
        "flash_attn",
        external.run_flash_attn,
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16),
        head_dims=lambda d: d % 8 == 0 and d <= 256,
        min_capability=(8, 0),
        requires=("flash_attn",),
        check=partial(_external_limits, "flash_attn.flash_attn_interface", "flash-attn 2", True),
    )
)
ATTENTION.register(
    Backend(
        "xformers",
        external.run_xformers,
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16),
        head_dims=lambda d: d % 8 == 0 and d <= 256,
        requires=("xformers",),
        check=_xformers_limits,
    )
)
ATTENTION.register(
    Backend("sdpa", _run_sdpa, dtypes=(torch.float16, torch.bfloat16, torch.float32), check=_sdpa_limits)
)
ATTENTION.register(Backend("torch", _run_torch))


# ---- public function -------------------------------------------------------------


def _check_rotary(rotary, q: Tensor, k: Tensor) -> None:
    """Tables as :func:`mmfast.ops.apply_rotary` takes them, for q's tokens and k's alike.
    Every problem is a ValueError naming ``rotary``."""
    if not (isinstance(rotary, (tuple, list)) and len(rotary) == 2):
        raise ValueError(f"rotary: expected None or a pair (cos, sin), got {type(rotary).__name__}")
    cos, sin = rotary
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise ValueError(f"rotary: {name}: expected a Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"rotary: {name}: expected a floating dtype, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"rotary: {name}: expected device {q.device} (that of q), got {t.device}")
    if sin.shape != cos.shape:
        raise ValueError(f"rotary: sin: expected shape {tuple(cos.shape)} (that of cos), got {tuple(sin.shape)}")
    if k.shape[:-2] != q.shape[:-2]:
        raise ValueError(
            f"rotary: needs q and k over the same tokens (one table row per token, for both), got q "
            f"{tuple(q.shape)} and k {tuple(k.shape)}; rotate them apart with mmfast.ops.apply_rotary"
        )
    tokens = q.shape[-3]
    allowed = [(tokens,)] + ([(q.shape[0], tokens)] if q.dim() == 4 else [])
    if cos.dim() < 2 or tuple(cos.shape[:-1]) not in allowed:
        layouts = "[T, R/2]" + (" or [B, T, R/2]" if q.dim() == 4 else "")
        raise ValueError(
            f"rotary: cos: expected {layouts} for q of shape {tuple(q.shape)}, got {tuple(cos.shape)}"
        )
    if not 1 <= 2 * cos.shape[-1] <= q.shape[-1]:
        raise ValueError(
            f"rotary: cos: last dim R/2 = {cos.shape[-1]} gives rotary dim {2 * cos.shape[-1]}, expected "
            f"2..{q.shape[-1]} (the head dim); tables are half-width (from full-width ones: cos[..., :R // 2])"
        )


def _check_qk_norm(qk_norm, q: Tensor):
    """(q_weight, k_weight, eps) as rms_norm takes them, for every head of q and of k.
    Every problem is a ValueError or TypeError naming ``qk_norm``; returns eps as a float."""
    if not isinstance(qk_norm, (tuple, list)):
        raise TypeError(f"qk_norm: expected None or (q_weight, k_weight, eps), got {type(qk_norm).__name__}")
    if len(qk_norm) != 3:
        raise ValueError(f"qk_norm: expected None or (q_weight, k_weight, eps), weights [D] or None, got "
                         f"{type(qk_norm).__name__} of length {len(qk_norm)}")
    for name, w in (("q_weight", qk_norm[0]), ("k_weight", qk_norm[1])):
        if w is None:
            continue
        if not isinstance(w, Tensor):
            raise TypeError(f"qk_norm: {name}: expected a Tensor or None, got {type(w).__name__}")
        if not w.dtype.is_floating_point:
            raise TypeError(f"qk_norm: {name}: expected a floating dtype, got {w.dtype}")
        if w.shape != q.shape[-1:]:
            raise ValueError(f"qk_norm: {name}: expected shape ({q.shape[-1]},) (the head dim), got {tuple(w.shape)}")
        if w.device != q.device:
            raise ValueError(f"qk_norm: {name}: expected device {q.device} (that of q), got {w.device}")
    eps = qk_norm[2]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"qk_norm: eps: expected a finite number > 0, got {eps!r}")
    return float(eps)


def _window_side(w) -> bool:
    return isinstance(w, int) and not isinstance(w, bool) and w >= -1


def _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, scale):
    """Shape/dtype/device checks (no sync unless noted). Returns (max_seqlen_q, max_seqlen_k)."""
    check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and _window_side(window[0])
            and _window_side(window[1])):
        raise ValueError(f"window: expected (left, right), ints >= -1 (-1: unbounded), got {window!r}")
    check_scale(scale)
    return check_lengths(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              causal=False, window=(-1, -1), scale=None, rotary=None, qk_norm=None, return_lse=False,
              dropout_p=0.0, generator=None, backend=None):
    """Softmax attention of ``q`` over ``k``, ``v``; returns ``out`` (like q), or
    ``(out, lse)`` with ``return_lse=True``. See the module docstring for the layouts,
    the window and causal rules, and which checks cost a device sync.

    Device syncs: with packed inputs and ``max_seqlen_q``/``max_seqlen_k`` given (Python
    ints), nothing is read back to the host (needed for CUDA graphs and for torch.compile
    without graph breaks), except on the xformers backend (one sync, for its mask). Left
    out, they are computed from cu_seqlens in one sync, which also checks cu_seqlens'
    values (start at 0, non-decreasing, last entry = token count); MMFAST_DEBUG_CHECKS=1
    makes every call pay that sync. All other checks (dtypes, devices, shapes, head
    counts, window, scale) read only shapes and Python values. Segment sizes choose the
    backend: segments of at most 128 tokens go to ``triton_short``.

    ``rotary=(cos, sin)`` rotates q and k first (rotate-half), with the tables
    :func:`mmfast.ops.apply_rotary` takes ([T, R/2], or [B, T, R/2] padded; R <= D): the
    result and the q/k/v gradients are those of ``attention(*apply_rotary(q, k, cos,
    sin), v, ...)``. Row t of the tables rotates token t of q and of k, so q and k must
    have the same tokens (self-attention; cu_seqlens_q and cu_seqlens_k may still
    differ). The ``triton`` and ``triton_short`` backends rotate tiles as their kernels
    load them, and in the backward pass rotate dq and dk back in the kernels; the other
    backends compose
    apply_rotary and attention. Tables that require grad get their gradient through the
    composition (the fused kernels give none).

    ``qk_norm=(q_weight, k_weight, eps)`` RMS-normalises every head of q and of k over the
    head dim before the rotation, as FLUX, SD3.5, Qwen-Image and Qwen3 do (weights [D],
    each None for no affine; eps > 0): the result and the gradients (q, k, v and both
    weights) are those of ``attention(*apply_rotary(rms_norm(q, q_weight, eps),
    rms_norm(k, k_weight, eps), cos, sin), v, ...)`` (without rotary, of the normalised q
    and k). The ``triton`` backend normalises q tiles as its forward kernel loads them (k in
    the pass that rotates it), and in the backward pass reads normalised and rotated copies,
    its dq and dk (wrt the normalised q, k) going through the RMSNorm backward kernel, which
    also gives the weight gradients; every other backend (triton_short included) composes
    rms_norm first.

    ``dropout_p`` > 0 drops attention probabilities (kept ones scaled by 1 / (1 - p); lse
    is unaffected), with a mask drawn from ``generator`` (the default generator of q's
    device when None): always applied, so pass 0 outside training, as for
    F.scaled_dot_product_attention. The triton, triton_short and torch backends draw one
    seed (mmfast.ops.attention_dropout.draw_seed: a device tensor, no sync) and generate
    the same Philox mask from it, the backward regenerating it; sdpa and flash_attn pass p
    to their own dropout (their generator, their mask; no ``generator=``); the other
    backends decline dropout. ``dropout_p=0`` runs exactly the kernels without dropout.

    Example::

        >>> q = torch.randn(10, 4, 64)                  # 10 tokens, 4 heads
        >>> kv = torch.randn(10, 2, 64)                 # 2 K/V heads (GQA)
        >>> cu = torch.tensor([0, 3, 10], dtype=torch.int32)
        >>> out = mmfast.ops.attention(q, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu,
        ...                            max_seqlen_q=7, max_seqlen_k=7, causal=True)
        >>> out.shape
        torch.Size([10, 4, 64])
        >>> out, lse = mmfast.ops.attention(torch.randn(2, 5, 4, 64), torch.randn(2, 9, 4, 64),
        ...                                 torch.randn(2, 9, 4, 64), window=(3, 0), return_lse=True)
        >>> lse.shape
        torch.Size([2, 4, 5])
    """
    max_seqlen_q, max_seqlen_k = _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k, window, scale)
    dropout_p = check_dropout(dropout_p, generator, q.device)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if rotary is not None:
        _check_rotary(rotary, q, k)
    norm_eps = None if qk_norm is None else _check_qk_norm(qk_norm, q)
    window_left, window_right = window
    if causal:
        window_right = 0
    head_dim = q.shape[-1]  # (read once: each tensor property read costs a fraction of a us)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    layout = "packed" if q.dim() == 3 else "padded"
    requires_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
        or (rotary is not None and (rotary[0].requires_grad or rotary[1].requires_grad))
        or (qk_norm is not None and any(w is not None and w.requires_grad for w in qk_norm[:2])))
    call = Call(device=q.device, dtype=q.dtype, head_dim=head_dim, layout=layout,
                facts={"return_lse": bool(return_lse), "causal": causal, "window": (window_left, window_right),
                       "max_seqlen_q": max_seqlen_q, "max_seqlen_k": max_seqlen_k,
                       "head_dim": head_dim, "requires_grad": requires_grad,
                       "dropout_p": dropout_p, "generator": generator is not None})
    chosen = ATTENTION.select(call, backend)
    run = chosen.run
    if dropout_p > 0:
        seed = draw_seed(q.device, generator) if chosen.name in PHILOX_DROPOUT else None
        run = partial(run, dropout_p=dropout_p, seed=seed)
    fuse_rotary = rotary is not None and chosen.name in FUSES_ROTARY and not (
        torch.is_grad_enabled() and (rotary[0].requires_grad or rotary[1].requires_grad))
    if qk_norm is not None:
        # The norm comes before the rotation: fused only where the rotation is too (or absent).
        if chosen.name in FUSES_QK_NORM and (rotary is None or fuse_rotary):
            run = partial(run, qk_norm=(qk_norm[0], qk_norm[1], norm_eps))
        else:
            norm_backend = "torch" if chosen.name == "torch" else None
            q = rms_norm(q, qk_norm[0], norm_eps, backend=norm_backend)
            k = rms_norm(k, qk_norm[1], norm_eps, backend=norm_backend)
    if rotary is not None:
        cos, sin = rotary
        if fuse_rotary:
            run = partial(run, rotary=(cos, sin))
        else:
            q, k = apply_rotary(q, k, cos, sin, backend="torch" if chosen.name == "torch" else None)
    out, lse = run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   window_left, window_right, scale)
    return (out, lse) if return_lse else out
