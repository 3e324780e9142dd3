"""Triton kernels for adaLN modulation and the gated residual of DiT / MM-DiT blocks.

Shapes: X, Y, DY, DX, R (the residual stream) are [B, T, C] with contiguous rows (row r
is token r % T of sample r // T); SHIFT, SCALE, GATE are [B, C] with a row stride, one
row per sample, broadcast over its T tokens. Everything is computed in float32.

adaln_modulate (LayerNorm without affine, then the per-sample modulation)
    forward   xhat = (x - mean) * rstd,  y = xhat * (1 + scale[b]) + shift[b]
    backward  g = dy * (1 + scale[b]),  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
              dscale[b] = sum_t dy * xhat,  dshift[b] = sum_t dy

gated_residual
    forward   out = r + gate[b] * y
    backward  dr = dout (no kernel),  dy = dout * gate[b],  dgate[b] = sum_t dout * y

Backward programs own a run of tokens of one sample (grid [B, SPLITS]) and keep the
per-sample sums in registers; the launcher adds the SPLITS partials (deterministic).
"""

import torch
import triton
import triton.language as tl

from ._launch import dense, empty, multiprocessor_count, unit_last

# Whole rows live in registers.
MAX_C = 16384


@triton.jit
def _adaln_fwd_kernel(
    X, SHIFT, SCALE, Y, MEAN, RSTD,
    stride_shift, stride_scale,
    M, T, C, eps,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
    sample = (rows // T).to(tl.int64)[:, None]

    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    scale = tl.load(SCALE + sample * stride_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + sample * stride_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * (1.0 + scale) + shift
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_bwd_kernel(
    X, SCALE, DY, MEAN, RSTD, DX, DSCALE_PART, DSHIFT_PART,
    stride_scale,
    T, C, tokens_per_split,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    scale1 = 1.0 + tl.load(SCALE + b.to(tl.int64) * stride_scale + cols, mask=col_ok, other=0.0).to(tl.float32)
    dscale = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dshift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    t_begin = split * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, T)
    for t in range(t_begin, t_end):
        row = b.to(tl.int64) * T + t
        x = tl.load(X + row * C + cols, mask=col_ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * C + cols, mask=col_ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(col_ok, (x - tl.load(MEAN + row)) * rstd, 0.0)
        g = dy * scale1
        dx = rstd * (g - tl.sum(g, axis=0) / C - xhat * (tl.sum(g * xhat, axis=0) / C))
        tl.store(DX + row * C + cols, dx.to(DX.dtype.element_ty), mask=col_ok)
        dscale += dy * xhat
        dshift += dy
    part = (b * splits + split).to(tl.int64) * C
    tl.store(DSCALE_PART + part + cols, dscale, mask=col_ok)
    tl.store(DSHIFT_PART + part + cols, dshift, mask=col_ok)


@triton.jit
def _gated_residual_fwd_kernel(
    R, GATE, Y, OUT,
    stride_gate,
    M, T, C,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
    sample = (rows // T).to(tl.int64)[:, None]
    r = tl.load(R + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + sample * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, (r + gate * y).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    Y, GATE, DOUT, DY, DGATE_PART,
    stride_gate,
    T, C, tokens_per_split,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    gate = tl.load(GATE + b.to(tl.int64) * stride_gate + cols, mask=col_ok, other=0.0).to(tl.float32)
    dgate = tl.zeros((BLOCK_C,), dtype=tl.float32)
    t_begin = split * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, T)
    for t in range(t_begin, t_end):
        row = b.to(tl.int64) * T + t
        dout = tl.load(DOUT + row * C + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = tl.load(Y + row * C + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(DY + row * C + cols, (dout * gate).to(DY.dtype.element_ty), mask=col_ok)
        dgate += dout * y
    tl.store(DGATE_PART + (b * splits + split).to(tl.int64) * C + cols, dgate, mask=col_ok)


# ---- launchers -------------------------------------------------------------------


def _num_warps(elements: int) -> int:
    return min(16, max(4, triton.next_power_of_2(elements // 256)))


def _splits(batch: int, tokens: int, device: torch.device) -> tuple[int, int]:
    """(splits, tokens_per_split): about four programs per SM over the batch."""
    splits = max(1, min(tokens, triton.cdiv(4 * multiprocessor_count(device), max(batch, 1))))
    per_split = triton.cdiv(tokens, splits) if tokens else 1
    return (triton.cdiv(tokens, per_split) if tokens else 1), per_split


def adaln_fwd(x, shift, scale, eps: float):
    """Launch the forward. ``x`` [B, T, C] contiguous; returns (y, mean, rstd), the last
    two float32 [B * T]. ``shift``, ``scale`` [B, C]. Arguments without the strides the
    kernel assumes are copied to them first (here and below)."""
    x, shift, scale = dense(x), unit_last(shift), unit_last(scale)
    B, T, C = x.shape
    M = B * T
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    mean = empty((M,), dtype=torch.float32, device=x.device)
    rstd = empty((M,), dtype=torch.float32, device=x.device)
    if M == 0 or C == 0:
        return y, mean, rstd
    BLOCK_C = triton.next_power_of_2(C)
    BLOCK_M = max(1, min(16, 4096 // BLOCK_C))
    _adaln_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
        x, shift, scale, y, mean, rstd, shift.stride(0), scale.stride(0), M, T, C, eps,
        BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, num_warps=_num_warps(BLOCK_M * BLOCK_C),
    )
    return y, mean, rstd


def adaln_bwd(dy, x, scale, mean, rstd):
    """Launch the backward. Returns (dx, dshift, dscale), the last two float32 [B, C]."""
    dy, x, scale, mean, rstd = dense(dy), dense(x), unit_last(scale), dense(mean), dense(rstd)
    B, T, C = x.shape
    dx = empty(x.shape, dtype=x.dtype, device=x.device)
    splits, per_split = _splits(B, T, x.device)
    dscale = torch.zeros((B, splits, C), dtype=torch.float32, device=x.device)
    dshift = torch.zeros_like(dscale)
    if B * T > 0 and C > 0:
        BLOCK_C = triton.next_power_of_2(C)
        _adaln_bwd_kernel[(B, splits)](
            x, scale, dy, mean, rstd, dx, dscale, dshift, scale.stride(0), T, C, per_split,
            BLOCK_C=BLOCK_C, num_warps=_num_warps(BLOCK_C),
        )
    return dx, dshift.sum(1), dscale.sum(1)


_GATE_BLOCK_C = 1024


def gated_residual_fwd(r, gate, y):
    """Launch the forward of ``r + gate[:, None] * y``; r, y [B, T, C] contiguous."""
    r, gate, y = dense(r), unit_last(gate), dense(y)
    B, T, C = r.shape
    M = B * T
    out = empty(r.shape, dtype=r.dtype, device=r.device)
    if M == 0 or C == 0:
        return out
    BLOCK_C = min(_GATE_BLOCK_C, triton.next_power_of_2(C))
    BLOCK_M = max(1, 4096 // BLOCK_C)
    _gated_residual_fwd_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(C, BLOCK_C))](
        r, gate, y, out, gate.stride(0), M, T, C,
        BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, num_warps=_num_warps(BLOCK_M * BLOCK_C),
    )
    return out


def gated_residual_bwd(dout, gate, y):
    """Launch the backward. Returns (dy, dgate); dgate float32 [B, C]."""
    dout, gate, y = dense(dout), unit_last(gate), dense(y)
    B, T, C = y.shape
    dy = empty(y.shape, dtype=y.dtype, device=y.device)
    splits, per_split = _splits(B, T, y.device)
    dgate = torch.zeros((B, splits, C), dtype=torch.float32, device=y.device)
    if B * T > 0 and C > 0:
        BLOCK_C = min(_GATE_BLOCK_C, triton.next_power_of_2(C))
        _gated_residual_bwd_kernel[(B, splits, triton.cdiv(C, BLOCK_C))](
            y, gate, dout, dy, dgate, gate.stride(0), T, C, per_split,
            BLOCK_C=BLOCK_C, num_warps=_num_warps(BLOCK_C),
        )
    return dy, dgate.sum(1)
