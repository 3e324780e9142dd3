"""Triton kernels for RMSNorm and LayerNorm over the last dimension, with an optional
residual added first. One kernel pair serves both norms (``IS_RMS``).

Shapes: X, Y, RES, RES_OUT are [M, N] row-major with a row stride; W, B are [N];
MEAN, RSTD are [M] float32. Everything is computed in float32.

Forward (one tile of BLOCK_M rows per program, whole rows in registers):
    h = x + res                     (rounded to x's dtype, stored as RES_OUT)
    mean = sum(h) / N               (LayerNorm only)
    rstd = 1 / sqrt(sum((h - mean)^2) / N + eps)        (mean = 0 for RMSNorm)
    y = (h - mean) * rstd * w + b

Rows wider than MAX_BLOCK_N (MAX_BLOCK_N_BWD) take the looped kernels, which walk a row in BLOCK_N chunks:
statistics first (the mean, then the centred sum of squares), then the output, recomputing
h = x + res from the inputs in each pass. Their backward adds the weight and bias
gradients of each chunk to the program's own float32 partial rows in memory.

Backward (a fixed number of programs, each looping over a contiguous run of rows so
that the weight and bias gradients accumulate in registers; partial sums per program
are added up by the launcher, which keeps the result deterministic):
    xhat = (h - mean) * rstd,  g = dy * w
    dh = rstd * (g - xhat * mean(g * xhat) - mean(g))   (last term LayerNorm only)
    dh += d(res_out)                                    (when the residual stream has a gradient)
    dw = sum_rows(dy * xhat),  db = sum_rows(dy)
"""

import torch
import triton
import triton.language as tl

from ._launch import dense, empty, multiprocessor_count, unit_last

# The widest rows the op's dispatch gives these kernels (wider ones fall back to another
# backend): the widest the sm_90a compile gate checks (mmfast/compile_gate/cases.py). The
# looped kernels themselves take any width, but the backward's float32 dw/db partial rows
# ([programs, N], programs = 4 x SMs) grow with it: 138 MB each at N = 65536 on an H100.
MAX_N = 65536
# Rows up to this width live in registers whole; wider rows are walked in chunks of this
# width (the looped kernels): a whole 64k-wide row held at once spills on an H100. The
# backward holds more per element (h, dy, w and the dw, db sums): it loops above 8k.
MAX_BLOCK_N = 16384
MAX_BLOCK_N_BWD = 8192
# The looped backward's chunk: 8192 wide spilled 8 B under triton 3.6 (16 warps, 128
# registers a thread at most); 4096 leaves room under both 3.6 and 3.9.
LOOPED_BWD_BLOCK_N = 4096


@triton.jit
def _norm_fwd_kernel(
    X, RES, W, B, Y, RES_OUT, MEAN, RSTD,
    stride_x, stride_res, stride_y, stride_res_out,
    M, N, eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    h = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(RES + rows64 * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # The residual stream is stored in the input dtype; normalise exactly what is stored.
        h = h.to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + rows64 * stride_res_out + cols[None, :], h, mask=mask)
        h = h.to(tl.float32)

    if IS_RMS:
        centred = h
    else:
        mean = tl.sum(h, axis=1) / N
        tl.store(MEAN + rows, mean, mask=row_ok)
        centred = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)

    y = centred * rstd[:, None]
    if HAS_W:
        y *= tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    H, W, DY, DRES_OUT, DX, DW_PARTIAL, DB_PARTIAL, MEAN, RSTD,
    stride_h, stride_dy, stride_dres_out, stride_dx,
    M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_DRES_OUT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)

    # int64 bounds make the loop variable int64, so row offsets cannot overflow.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        h = tl.load(H + row * stride_h + cols, mask=col_ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=col_ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if IS_RMS:
            xhat = h * rstd
        else:
            xhat = tl.where(col_ok, (h - tl.load(MEAN + row)) * rstd, 0.0)
        if HAS_W:
            g = dy * w
        else:
            g = dy
        dw += dy * xhat
        db += dy
        dh = g - xhat * (tl.sum(g * xhat, axis=0) / N)
        if not IS_RMS:
            dh -= tl.sum(g, axis=0) / N
        dh *= rstd
        if HAS_DRES_OUT:
            dh += tl.load(DRES_OUT + row * stride_dres_out + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=col_ok)

    if HAS_W:
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)
    if HAS_B:
        tl.store(DB_PARTIAL + pid * N + cols, db, mask=col_ok)


@triton.jit
def _load_h(X, RES, RES_OUT, x_row, res_row, res_out_row, cols, ok,
            HAS_RES: tl.constexpr, STORE_RES: tl.constexpr):
    """h = x (+ res, rounded to the input dtype and stored when STORE_RES) in float32."""
    h = tl.load(X + x_row + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(RES + res_row + cols, mask=ok, other=0.0).to(tl.float32)
        h = h.to(RES_OUT.dtype.element_ty)
        if STORE_RES:
            tl.store(RES_OUT + res_out_row + cols, h, mask=ok)
        h = h.to(tl.float32)
    return h


@triton.jit
def _norm_fwd_looped_kernel(
    X, RES, W, B, Y, RES_OUT, MEAN, RSTD,
    stride_x, stride_res, stride_y, stride_res_out,
    M, N, eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row, res_row = row * stride_x, row * stride_res
    y_row, res_out_row = row * stride_y, row * stride_res_out
    offs = tl.arange(0, BLOCK_N)
    mean = 0.0
    if not IS_RMS:
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            total += _load_h(X, RES, RES_OUT, x_row, res_row, res_out_row, cols, cols < N, HAS_RES, False)
        mean = tl.sum(total, axis=0) / N
        tl.store(MEAN + row, mean)
    squares = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs
        ok = cols < N
        h = _load_h(X, RES, RES_OUT, x_row, res_row, res_out_row, cols, ok, HAS_RES, True)
        centred = tl.where(ok, h - mean, 0.0)
        squares += centred * centred
    rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    for start in range(0, N, BLOCK_N):
        cols = start + offs
        ok = cols < N
        y = (_load_h(X, RES, RES_OUT, x_row, res_row, res_out_row, cols, ok, HAS_RES, False) - mean) * rstd
        if HAS_W:
            y *= tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_B:
            y += tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + y_row + cols, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _norm_bwd_looped_kernel(
    H, W, DY, DRES_OUT, DX, DW_PARTIAL, DB_PARTIAL, MEAN, RSTD,
    stride_h, stride_dy, stride_dres_out, stride_dx,
    M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_DRES_OUT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    partial = pid.to(tl.int64) * N
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        rstd = tl.load(RSTD + row)
        mean = 0.0
        if not IS_RMS:
            mean = tl.load(MEAN + row)
        # Pass 1: the row sums of g * xhat (and of g for LayerNorm).
        sum_gx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        sum_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            ok = cols < N
            xhat = tl.where(ok, (tl.load(H + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
            g = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_W:
                g *= tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
            sum_gx += g * xhat
            sum_g += g
        mean_gx = tl.sum(sum_gx, axis=0) / N
        mean_g = tl.sum(sum_g, axis=0) / N
        # Pass 2: dx, and this row's share of the weight and bias gradients.
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            ok = cols < N
            xhat = tl.where(ok, (tl.load(H + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
            dy = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_W:
                g = dy * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
            else:
                g = dy
            dh = g - xhat * mean_gx
            if not IS_RMS:
                dh -= mean_g
            dh *= rstd
            if HAS_DRES_OUT:
                dh += tl.load(DRES_OUT + row * stride_dres_out + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=ok)
            # Each program owns its partial rows, and each thread adds to the elements it
            # alone wrote before (same chunk layout): no race, no atomics.
            if HAS_W:
                tl.store(DW_PARTIAL + partial + cols,
                         tl.load(DW_PARTIAL + partial + cols, mask=ok, other=0.0) + dy * xhat, mask=ok)
            if HAS_B:
                tl.store(DB_PARTIAL + partial + cols,
                         tl.load(DB_PARTIAL + partial + cols, mask=ok, other=0.0) + dy, mask=ok)


def _num_warps(elements: int) -> int:
    # One warp per 256 elements of the tile, between 4 and 16 (32 only for huge rows).
    return min(32 if elements >= 32768 else 16, max(4, triton.next_power_of_2(elements // 256)))


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def norm_fwd(x, weight, bias, residual, eps: float, is_rms: bool):
    """Launch the forward kernel. Returns (y, residual_out, mean, rstd).

    ``residual_out`` (x + residual) is an empty tensor when ``residual`` is None, ``mean``
    one when ``is_rms``. ``x``, ``residual`` get a contiguous last dim and ``weight``,
    ``bias`` are made contiguous (the kernel reads them with unit strides) if they are not.
    """
    x, residual, weight, bias = unit_last(x), unit_last(residual), dense(weight), dense(bias)
    N = x.shape[-1]
    x2 = _rows_2d(x)
    M = x2.shape[0]
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = empty(x.shape if residual is not None else (0,), dtype=x.dtype, device=x.device)
    mean = empty((M,) if not is_rms else (0,), dtype=torch.float32, device=x.device)
    rstd = empty((M,), dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return y, res_out, mean, rstd

    res2 = _rows_2d(residual) if residual is not None else x2
    res_out2 = _rows_2d(res_out) if residual is not None else x2
    y2 = _rows_2d(y)
    args = (
        x2, res2, weight if weight is not None else x2, bias if bias is not None else x2,
        y2, res_out2, mean if not is_rms else rstd, rstd,
        x2.stride(0), res2.stride(0), y2.stride(0), res_out2.stride(0),
        M, N, eps,
    )
    flags = dict(IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None)
    BLOCK_N = triton.next_power_of_2(N)
    if BLOCK_N > MAX_BLOCK_N:
        _norm_fwd_looped_kernel[(M,)](*args, **flags, BLOCK_N=MAX_BLOCK_N, num_warps=_num_warps(MAX_BLOCK_N))
        return y, res_out, mean, rstd
    BLOCK_M = max(1, min(64, 4096 // BLOCK_N))
    _norm_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
        *args, **flags, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=_num_warps(BLOCK_M * BLOCK_N),
    )
    return y, res_out, mean, rstd


def norm_bwd(dy, h, weight, has_bias: bool, mean, rstd, dres_out, is_rms: bool):
    """Launch the backward kernel. Returns (dx, dweight, dbias), the last two in float32.

    ``h`` is the tensor that was normalised (x, or x + residual). ``dres_out`` is the
    gradient of the residual stream output, or None. ``dweight``/``dbias`` are empty
    tensors when there is no weight/bias. Strided arguments are made unit-stride first.
    """
    dy, h, dres_out = unit_last(dy), unit_last(h), unit_last(dres_out)
    weight, mean, rstd = dense(weight), dense(mean), dense(rstd)
    N = h.shape[-1]
    h2, dy2 = _rows_2d(h), _rows_2d(dy)
    M = h2.shape[0]
    dx = empty(h.shape, dtype=h.dtype, device=h.device)
    dx2 = _rows_2d(dx)
    programs = max(1, min(M, 4 * multiprocessor_count(h.device)))
    rows_per_program = triton.cdiv(M, programs) if M else 0
    dw_partial = torch.zeros((programs, N) if weight is not None else (0,), dtype=torch.float32, device=h.device)
    db_partial = torch.zeros((programs, N) if has_bias else (0,), dtype=torch.float32, device=h.device)
    if M > 0 and N > 0:
        dres2 = _rows_2d(dres_out) if dres_out is not None else dy2
        BLOCK_N = triton.next_power_of_2(N)
        kernel = _norm_bwd_kernel
        if BLOCK_N > MAX_BLOCK_N_BWD:
            kernel, BLOCK_N = _norm_bwd_looped_kernel, min(LOOPED_BWD_BLOCK_N, MAX_BLOCK_N_BWD)
        kernel[(programs,)](
            h2, weight if weight is not None else h2, dy2, dres2, dx2, dw_partial, db_partial,
            mean if not is_rms else rstd, rstd,
            h2.stride(0), dy2.stride(0), dres2.stride(0), dx2.stride(0),
            M, N, rows_per_program,
            IS_RMS=is_rms, HAS_DRES_OUT=dres_out is not None,
            HAS_W=weight is not None, HAS_B=has_bias,
            BLOCK_N=BLOCK_N, num_warps=_num_warps(BLOCK_N),
        )
    dw = dw_partial.sum(0) if weight is not None else dw_partial
    db = db_partial.sum(0) if has_bias else db_partial
    return dx, dw, db
