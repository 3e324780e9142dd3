"""Cross-attention: queries (learned latents, or text tokens) over keys of another modality
(image tokens), with a structured mask and an optional fused tanh gate and residual.

Layouts (Hq query heads, Hk K/V heads dividing Hq; query head h reads K/V head h // (Hq/Hk)):

    packed: q [Tq, Hq, D], k, v [Tk, Hk, D], cu_seqlens_q/k int32 [B+1]: sample b's queries
            are rows cu_seqlens_q[b] .. cu_seqlens_q[b+1], its keys likewise (every sample
            its own number of image tokens, possibly 0)
    padded: q [B, Tq, Hq, D], k, v [B, Tk, Hk, D]

    attn_i = sum_j softmax_j(scale * q_i . k_j) v_j   over the keys j of its sample that
                                                      query i sees (``mask``; all without)
    out    = residual + tanh(gate) * attn              (each term only when given)

``gate`` is a tensor of 1 element or of Hq elements (one per query head), in any floating
dtype; tanh is applied here, as Flamingo and Llama 3.2 Vision (Mllama) do with their
``attn_gate``. ``residual`` has q's shape and dtype. A query that sees no key (a sample
without image, a text token before its first image) gets attn = 0, so out = residual:
never NaN, and no gradient flows through its attention. Masks are the types of
mmfast.ops.cross_attention_masks (KeyPaddingMask, ImagesUpToPositionMask, LatestImageMask),
never dense tensors.

Gradients: q, k, v, gate and residual.

``dropout_p`` > 0 drops attention probabilities (kept ones scaled by 1 / (1 - p)) before
the epilogue, with the Philox mask of mmfast.ops.attention_dropout, shared by the triton
and torch backends and regenerated in the backward; the seed is drawn on the device (no
sync). sdpa drops with its own generator.

Device syncs: packed inputs without ``max_seqlen_q``/``max_seqlen_k`` read the longest
segment back to the host (one sync, which also checks the cu_seqlens values); with both
given, nothing is read back (CPU tensors are checked all the same: no sync to avoid). On a
device the triton kernels clamp cu_seqlens into [0, rows] (bad values give unspecified
rows, never an access outside the tensors) and loop past a max_seqlen smaller than the
longest segment (slower, still exact). Mask values (sorted image positions, images in order and
within their sample's keys) are the caller's promise; ``MMFAST_DEBUG_CHECKS=1`` checks
them on every call (one more sync).

Backends, in priority order: ``triton`` (fp16, bf16, fp32; head dim 8..256, below 32
multiples of 8; the key axis split over programs when queries are few, flash-decoding
style; CUDA, or CPU under TRITON_INTERPRET=1), ``sdpa`` (torch's scaled_dot_product_attention with the mask
materialised densely, as Hugging Face models do; on a CPU without a mask, one SDPA call per
run of equal samples, mmfast.ops._sdpa_segments), ``torch`` (the reference below).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from mmfast.dispatch import Backend, Call, op_family
from mmfast.ops._attention_checks import (check_lengths, check_qkv, check_scale, check_tensor, debug_checks,
                                          triton_head_dim)
from mmfast.ops._sdpa_contained import attend_values, sdpa_contained
from mmfast.ops._sdpa_segments import attend_on_host
from mmfast.ops.attention_dropout import apply_dropout, check_dropout, draw_seed, keep_mask
from mmfast.ops.cross_attention_masks import CrossAttentionMask, _rows


# ---- reference -------------------------------------------------------------------


def visibility(q: Tensor, k: Tensor, cu_seqlens_q=None, cu_seqlens_k=None, mask=None) -> Tensor:
    """Dense boolean mask: [Tq, Tk] packed (block-diagonal over samples), [B, Tq, Tk] padded."""
    if mask is not None:
        return mask.materialize(q, k, cu_seqlens_q, cu_seqlens_k)
    if cu_seqlens_q is None:
        return torch.ones(q.shape[0], q.shape[1], k.shape[1], dtype=torch.bool, device=q.device)
    sample_q, _ = _rows(cu_seqlens_q, q)
    sample_k, _ = _rows(cu_seqlens_k, k)
    return sample_q[:, None] == sample_k[None, :]


def _gate_factor(gate: Tensor, like: Tensor) -> Tensor:
    """tanh(gate) shaped to broadcast over [..., Hq, D]."""
    t = torch.tanh(gate.to(like.dtype))
    return t.reshape(()) if gate.numel() == 1 else t.reshape(-1, 1)


def cross_attention_reference(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, mask=None, scale=None,
                              gate=None, residual=None, upcast: bool = True, dropout_p: float = 0.0,
                              dropout_seed: Tensor | None = None):
    """Plain PyTorch, loop-free, with the dense mask; float32 (float64 for float64 inputs).

    ``upcast=False`` does the matmuls and the epilogue in the input dtype (softmax still in
    float32), as PyTorch eager would: the tests' "eager" baseline. ``dropout_p`` > 0 drops
    probabilities with the Triton kernels' mask for ``dropout_seed``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else (torch.float32 if upcast else q.dtype)
    softmax_dtype = torch.float64 if compute == torch.float64 else torch.float32
    group = q.shape[-2] // k.shape[-2]
    qc = q.transpose(-3, -2).to(compute)
    kc = k.transpose(-3, -2).to(compute).repeat_interleave(group, dim=-3)
    vc = v.transpose(-3, -2).to(compute).repeat_interleave(group, dim=-3)
    seen = visibility(q, k, cu_seqlens_q, cu_seqlens_k, mask)
    if q.dim() == 4:
        seen = seen[:, None]  # [B, 1, Tq, Tk] over the heads
    sees_any = seen.any(-1, keepdim=True)
    scores = ((qc @ kc.transpose(-1, -2)) * scale).to(softmax_dtype).masked_fill(~seen, float("-inf"))
    # Rows that see nothing get constant scores, so no gradient flows from them.
    scores = torch.where(sees_any, scores, torch.zeros((), dtype=softmax_dtype, device=q.device))
    probs = torch.softmax(scores, dim=-1) * sees_any
    if dropout_p > 0:
        probs = apply_dropout(probs, keep_mask(dropout_seed, dropout_p, q, k, cu_seqlens_k), dropout_p)
    attn = attend_values(probs.to(compute), vc, seen).transpose(-3, -2)  # NaN/Inf kept in its sample
    return _epilogue(attn, gate, residual, compute).to(q.dtype)


def _epilogue(attn: Tensor, gate, residual, dtype) -> Tensor:
    if gate is not None:
        attn = _gate_factor(gate, attn) * attn
    if residual is not None:
        attn = residual.to(dtype) + attn
    return attn


# ---- custom ops (opaque to torch.compile, traced through their fake impls) ---------


@torch.library.custom_op("mmfast::cross_attention_fwd", mutates_args=())
def _cross_attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    batch: int, seqlen_q: int, seqlen_k: int, max_seqlen_q: int, max_seqlen_k: int,
    key_group: Optional[Tensor], query_first: Optional[Tensor], query_last: Optional[Tensor],
    query_key_lo: Optional[Tensor], query_key_hi: Optional[Tensor],
    alpha: Optional[Tensor], residual: Optional[Tensor], scale: float,
    seed: Optional[Tensor], dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, o, lse); o is empty when there is no epilogue (out is then o)."""
    from mmfast.kernels.cross_attention import cross_attention_fwd

    mask = None if key_group is None else (key_group, query_first, query_last, query_key_lo, query_key_hi)
    out, o, lse = cross_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, batch, seqlen_q, seqlen_k,
                                      max_seqlen_q, max_seqlen_k, mask, alpha, residual, scale,
                                      seed, dropout_p)
    if o is out:
        o = q.new_empty(0)
    return out, o, lse


@_cross_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, batch, seqlen_q, seqlen_k, max_seqlen_q, max_seqlen_k,
      key_group, query_first, query_last, query_key_lo, query_key_hi, alpha, residual, scale, seed, dropout_p):
    epilogue = alpha is not None or residual is not None
    o = q.new_empty(q.shape) if epilogue else q.new_empty(0)
    return q.new_empty(q.shape), o, q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("mmfast::cross_attention_bwd", mutates_args=())
def _cross_attention_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    batch: int, seqlen_q: int, seqlen_k: int, max_seqlen_q: int, max_seqlen_k: int,
    key_group: Optional[Tensor], query_first: Optional[Tensor], query_last: Optional[Tensor],
    query_key_lo: Optional[Tensor], query_key_hi: Optional[Tensor],
    alpha: Optional[Tensor], scale: float, seed: Optional[Tensor], dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, r); r = rowsum(dout * o) [rows_q, Hq] with alpha, else empty."""
    from mmfast.kernels.cross_attention import cross_attention_bwd

    mask = None if key_group is None else (key_group, query_first, query_last, query_key_lo, query_key_hi)
    dq, dk, dv, r = cross_attention_bwd(dout, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, batch,
                                        seqlen_q, seqlen_k, max_seqlen_q, max_seqlen_k, mask, alpha, scale,
                                        seed, dropout_p)
    return dq, dk, dv, (r if r is not None else lse.new_empty(0))


@_cross_attention_bwd_op.register_fake
def _(dout, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, batch, seqlen_q, seqlen_k, max_seqlen_q,
      max_seqlen_k, key_group, query_first, query_last, query_key_lo, query_key_hi, alpha, scale, seed, dropout_p):
    r = lse.new_empty(lse.shape) if alpha is not None else lse.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), r


# ---- autograd --------------------------------------------------------------------


class CrossAttentionFunction(torch.autograd.Function):
    """Triton forward and backward on row tensors q [rows_q, Hq, D], k, v [rows_k, Hk, D]
    (last dim contiguous). ``alpha`` (= tanh(gate), float32 [1] or [Hq]) and ``residual``
    (contiguous like q) are optional. ``seed``, ``dropout_p``: attention dropout (None, 0
    without). Returns out, contiguous like q."""

    @staticmethod
    def forward(ctx, q, k, v, alpha, residual, cu_seqlens_q, cu_seqlens_k, mask, layout, scale, seed, dropout_p):
        mask = tuple(mask) if mask is not None else (None,) * 5
        out, o, lse = torch.ops.mmfast.cross_attention_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, *layout, *mask, alpha, residual, scale, seed, dropout_p)
        o = out if o.numel() == 0 and out.numel() != 0 else o
        ctx.save_for_backward(q, k, v, o, lse, alpha, cu_seqlens_q, cu_seqlens_k, seed, *mask)
        ctx.layout, ctx.scale, ctx.dropout_p = layout, scale, dropout_p
        ctx.has_residual = residual is not None
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, o, lse, alpha, cu_seqlens_q, cu_seqlens_k, seed, *mask = ctx.saved_tensors
        if dout is None:
            return (None,) * 12
        dout = dout.contiguous()
        if o.numel() == 0:  # empty query rows: o was never distinct from out
            o = torch.zeros_like(q)
        dq, dk, dv, r = torch.ops.mmfast.cross_attention_bwd(
            dout, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, *ctx.layout, *mask, alpha, ctx.scale,
            seed, ctx.dropout_p)
        dalpha = None
        if alpha is not None:
            dalpha = r.sum().reshape(alpha.shape) if alpha.numel() == 1 else r.sum(0)
        dresidual = dout if ctx.has_residual else None
        return dq, dk, dv, dalpha, dresidual, None, None, None, None, None, None, None


# ---- backends --------------------------------------------------------------------


def _as_rows(t: Tensor) -> Tensor:
    """[B, T, H, D] -> [B*T, H, D] (a view when possible); last dim contiguous."""
    if t.dim() == 4:
        t = t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3])
    return t if t.stride(-1) == 1 else t.contiguous()


def _distinct(t: Tensor | None, *others: Tensor | None) -> Tensor | None:
    # Dynamo cannot trace an autograd.Function given one tensor twice (k is v, residual is
    # q, one cu_seqlens for both sides); a view is a distinct tensor.
    return t.view_as(t) if t is not None and any(t is o for o in others) else t


def _run_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, scale, gate, residual,
                dropout_p=0.0, seed=None):
    packed = q.dim() == 3
    lowered = mask.lower(q, k, cu_seqlens_q, cu_seqlens_k) if mask is not None else None
    if packed:
        layout = (cu_seqlens_q.numel() - 1, 0, 0, max_seqlen_q, max_seqlen_k)
    else:
        layout = (q.shape[0], q.shape[1], k.shape[1], q.shape[1], k.shape[1])
    alpha = torch.tanh(gate.float()).reshape(-1) if gate is not None else None
    q_rows = _as_rows(q)
    k_rows = _distinct(_as_rows(k), q_rows)
    v_rows = _distinct(_as_rows(v), q_rows, k_rows)
    res = _distinct(_as_rows(residual).contiguous(), q_rows, k_rows, v_rows) if residual is not None else None
    cu_k = _distinct(cu_seqlens_k, cu_seqlens_q)
    out = CrossAttentionFunction.apply(q_rows, k_rows, v_rows, alpha, res, cu_seqlens_q, cu_k, lowered, layout, scale,
                                       seed, dropout_p)
    return out.view(q.shape)


def _run_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, scale, gate, residual,
              dropout_p=0.0, seed=None):
    if mask is None and q.device.type == "cpu" and not torch.compiler.is_compiling():
        # cu_seqlens read on the host for free: one SDPA call per run of equal samples
        attn = attend_on_host(q, k, v, cu_seqlens_q, cu_seqlens_k, (-1, -1), scale, dropout_p)
        if attn is not None:
            return _epilogue(attn, gate, residual, q.dtype)
    group = q.shape[-2] // k.shape[-2]
    qh = q.transpose(-3, -2)
    kh = k.transpose(-3, -2).repeat_interleave(group, dim=-3)
    vh = v.transpose(-3, -2).repeat_interleave(group, dim=-3)
    seen = visibility(q, k, cu_seqlens_q, cu_seqlens_k, mask)
    if q.dim() == 4:
        seen = seen[:, None]
    if k.shape[-3] == 0:  # no keys: every query sees nothing (q * 0 keeps the graph)
        attn = q * 0
    else:
        # A NaN/Inf key or value stays with the queries that see it (not the other samples).
        # Dropout uses SDPA's own generator (torch's default one): not the Triton kernels' mask.
        attn = sdpa_contained(qh, kh, vh, seen, scale, dropout_p).transpose(-3, -2)
    return _epilogue(attn, gate, residual, q.dtype)


def _run_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, scale, gate, residual,
               dropout_p=0.0, seed=None):
    return cross_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, mask, scale, gate, residual,
                                     dropout_p=dropout_p, dropout_seed=seed)


def _sdpa_limits(call: Call):
    if call.facts.get("dropout_p", 0.0) > 0 and call.facts.get("generator", False):
        yield "generator= not supported with dropout (SDPA draws from torch's default generator)"


# Backends whose dropout is the Philox mask of mmfast.ops.attention_dropout.
PHILOX_DROPOUT = ("triton", "torch")


CROSS_ATTENTION = op_family("cross_attention")
CROSS_ATTENTION.register(
    Backend("triton", _run_triton, triton=True, dot=True, dtypes=(torch.float16, torch.bfloat16, torch.float32),
            head_dims=lambda d: triton_head_dim(d) and d <= 256)
)
CROSS_ATTENTION.register(Backend("sdpa", _run_sdpa, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                                 check=_sdpa_limits))
CROSS_ATTENTION.register(Backend("torch", _run_torch))


# ---- public function -------------------------------------------------------------


def _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, scale, gate, residual):
    """Shape/dtype/device checks (no sync unless noted). Returns (max_seqlen_q, max_seqlen_k)."""
    check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_scale(scale)
    heads = q.shape[-2]
    if gate is not None:
        if not isinstance(gate, Tensor) or not gate.dtype.is_floating_point:
            raise TypeError(f"gate: expected a floating-point Tensor, got {getattr(gate, 'dtype', type(gate).__name__)}")
        if gate.device != q.device:
            raise ValueError(f"gate: expected device {q.device} (that of q), got {gate.device}")
        if gate.numel() not in (1, heads):
            raise ValueError(f"gate: expected 1 or {heads} (query heads) elements, got shape {tuple(gate.shape)}")
    if residual is not None:
        check_tensor("residual", residual, q)
        if residual.shape != q.shape:
            raise ValueError(f"residual: expected shape {tuple(q.shape)} (that of q), got {tuple(residual.shape)}")
    max_seqlen_q, max_seqlen_k = check_lengths(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if mask is not None:
        if not isinstance(mask, CrossAttentionMask):
            raise TypeError(
                "mask: expected None or a mask type of mmfast.ops.cross_attention_masks "
                f"(KeyPaddingMask, ImagesUpToPositionMask, LatestImageMask), got {type(mask).__name__}"
            )
        mask.check(q, k, cu_seqlens_q)
        if debug_checks():
            mask.check_values(k, cu_seqlens_k)
    return max_seqlen_q, max_seqlen_k


def cross_attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                    mask=None, scale=None, gate=None, residual=None, dropout_p=0.0, generator=None, backend=None):
    """``residual + tanh(gate) * attention(q, k, v)`` under a structured ``mask``; returns a
    tensor like q. See the module docstring for the layouts, the masks, the rows that see
    no key (attention 0: out = residual) and which checks cost a device sync.

    ``dropout_p`` > 0 drops attention probabilities before the epilogue (kept ones scaled
    by 1 / (1 - p)), with a mask drawn from ``generator`` (q's device's default generator
    when None); pass 0 outside training. The triton and torch backends apply the same
    Philox mask for the same generator state (mmfast.ops.attention_dropout), and the
    backward regenerates it; sdpa uses its own generator (no ``generator=``).

    Example::

        >>> from mmfast.ops.cross_attention_masks import ImagesUpToPositionMask
        >>> text = torch.randn(2, 12, 4, 64)                     # B=2, 12 text tokens, 4 heads
        >>> image = torch.randn(2, 20, 4, 64)                    # up to 20 image tokens
        >>> mask = ImagesUpToPositionMask(
        ...     image_positions=torch.tensor([[0, 6], [3, -1]]),  # sample 1 has one image
        ...     image_lengths=torch.tensor([[10, 10], [7, 0]]))
        >>> gate = torch.zeros(1, requires_grad=True)            # Mllama initialises it to 0
        >>> out = mmfast.ops.cross_attention(text, image, image, mask=mask, gate=gate, residual=text)
        >>> out.shape
        torch.Size([2, 12, 4, 64])
    """
    max_seqlen_q, max_seqlen_k = _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             mask, scale, gate, residual)
    dropout_p = check_dropout(dropout_p, generator, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    call = Call(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], layout="packed" if q.dim() == 3 else "padded",
                facts={"dropout_p": dropout_p, "generator": generator is not None})
    chosen = CROSS_ATTENTION.select(call, backend)
    dropout = {}
    if dropout_p > 0:
        seed = draw_seed(q.device, generator) if chosen.name in PHILOX_DROPOUT else None
        dropout = dict(dropout_p=dropout_p, seed=seed)
    return chosen.run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, scale, gate, residual,
                      **dropout)
