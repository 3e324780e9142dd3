"""Triton kernel for rotary position embeddings, applied to q and k in one launch.

Shapes: X is [B, T, H, D] with any strides except a unit stride on D (the packed layout
[T, H, D] is passed as B = 1); COS, SIN are [B, T, R/2] or, shared over the batch,
[T, R/2] (batch stride 0), with R = 2 * (R/2) <= D the rotary dim. Everything is
computed in float32.

Pair j (0 <= j < R/2) holds the elements (j, j + R/2) in the rotate-half layout
(GPT-NeoX, Llama, Qwen) and (2j, 2j + 1) in the interleaved one (GPT-J):

    out1 = x1 * cos_j - x2 * sin_j
    out2 = x2 * cos_j + x1 * sin_j
    out[R:] = x[R:]                   (partial rotary: the rest passes through)

The backward pass is the inverse rotation, the same kernel with sin negated (``CONJ``).
One program takes BLOCK_T tokens x BLOCK_H heads of q or of k (q's head blocks first),
so cos/sin are read once per token block and reused across heads.
"""

import torch
import triton
import triton.language as tl

from ._launch import empty, unit_last


@triton.jit
def _rotary_kernel(
    Q, K, OUT_Q, OUT_K, COS, SIN,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_oqb, stride_oqt, stride_oqh, stride_okb, stride_okt, stride_okh,
    stride_cb, stride_ct, stride_sb, stride_st,
    T, HQ, HK, D, HALF, q_head_blocks,
    INTERLEAVED: tl.constexpr, CONJ: tl.constexpr, HAS_TAIL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    if pid_h < q_head_blocks:
        X, OUT, H, h0 = Q, OUT_Q, HQ, pid_h * BLOCK_H
        sxb, sxt, sxh, sob, sot, soh = stride_qb, stride_qt, stride_qh, stride_oqb, stride_oqt, stride_oqh
    else:
        X, OUT, H, h0 = K, OUT_K, HK, (pid_h - q_head_blocks) * BLOCK_H
        sxb, sxt, sxh, sob, sot, soh = stride_kb, stride_kt, stride_kh, stride_okb, stride_okt, stride_okh

    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    t_ok = t < T
    r_ok = r < HALF
    table_mask = t_ok[:, None] & r_ok[None, :]
    cos = tl.load(COS + pid_b * stride_cb + t[:, None] * stride_ct + r[None, :], mask=table_mask, other=0.0)
    sin = tl.load(SIN + pid_b * stride_sb + t[:, None] * stride_st + r[None, :], mask=table_mask, other=0.0)
    cos = cos.to(tl.float32)[:, None, :]
    sin = sin.to(tl.float32)[:, None, :]
    if CONJ:
        sin = -sin

    row_mask = t_ok[:, None, None] & (h < H)[None, :, None]
    mask = row_mask & r_ok[None, None, :]
    x_rows = X + pid_b * sxb + t[:, None, None] * sxt + h[None, :, None] * sxh
    o_rows = OUT + pid_b * sob + t[:, None, None] * sot + h[None, :, None] * soh
    if INTERLEAVED:
        first = 2 * r[None, None, :]
        second = first + 1
    else:
        first = r[None, None, :]
        second = first + HALF
    x1 = tl.load(x_rows + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + second, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_rows + first, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_rows + second, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)

    if HAS_TAIL:
        tail = 2 * HALF + tl.arange(0, BLOCK_TAIL)[None, None, :]
        tail_mask = row_mask & (tail < D)
        tl.store(o_rows + tail, tl.load(x_rows + tail, mask=tail_mask), mask=tail_mask)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.unsqueeze(0)


def _table_strides(table: torch.Tensor) -> tuple[int, int]:
    """(batch stride, token stride) of a [T, R/2] or [B, T, R/2] table."""
    return (table.stride(0), table.stride(1)) if table.dim() == 3 else (0, table.stride(0))


def rotary(q, k, cos, sin, interleaved: bool, conj: bool):
    """Launch the kernel. Returns (out_q, out_k); out_k is an empty tensor when k is None.

    ``q``, ``k``: [T, H, D] or [B, T, H, D] with unit stride on D; ``cos``, ``sin``:
    [T, R/2] or [B, T, R/2] with unit stride on the last dim. ``conj`` rotates backwards
    (the gradient). Arguments without those unit strides are copied to them first.
    """
    q, k, cos, sin = unit_last(q), unit_last(k), unit_last(cos), unit_last(sin)
    out_q = empty(q.shape, dtype=q.dtype, device=q.device)
    out_k = empty(k.shape if k is not None else (0,), dtype=q.dtype, device=q.device)
    q4, oq4 = _as_4d(q), _as_4d(out_q)
    k4, ok4 = (_as_4d(k), _as_4d(out_k)) if k is not None else (q4, oq4)
    batch, tokens, heads_q, head_dim = q4.shape
    heads_k = k4.shape[2] if k is not None else 0
    half = cos.shape[-1]
    if q.numel() == 0 and (k is None or k.numel() == 0):
        return out_q, out_k

    BLOCK_R = triton.next_power_of_2(half)
    BLOCK_H = min(16, triton.next_power_of_2(max(heads_q, heads_k)))
    BLOCK_T = max(1, min(64, 4096 // (BLOCK_H * BLOCK_R)))
    q_head_blocks = triton.cdiv(heads_q, BLOCK_H)
    head_blocks = q_head_blocks + triton.cdiv(heads_k, BLOCK_H)
    grid = (triton.cdiv(tokens, BLOCK_T), head_blocks, batch)
    _rotary_kernel[grid](
        q4, k4, oq4, ok4, cos, sin,
        q4.stride(0), q4.stride(1), q4.stride(2), k4.stride(0), k4.stride(1), k4.stride(2),
        oq4.stride(0), oq4.stride(1), oq4.stride(2), ok4.stride(0), ok4.stride(1), ok4.stride(2),
        *_table_strides(cos), *_table_strides(sin),
        tokens, heads_q, heads_k, head_dim, half, q_head_blocks,
        INTERLEAVED=interleaved, CONJ=conj, HAS_TAIL=2 * half < head_dim,
        BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_R=BLOCK_R,
        BLOCK_TAIL=triton.next_power_of_2(max(1, head_dim - 2 * half)),
        num_warps=4,
    )
    return out_q, out_k
