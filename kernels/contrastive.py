"""Triton kernels for contrastive losses (CLIP softmax, SigLIP sigmoid, NT-Xent) that
never hold the B x B logits: every kernel recomputes score tiles from the features.

Shapes: X [M, D] (rows: image features) and Y [N, D] (columns: text features) have
contiguous rows; a score tile is always S = X[rows] @ Y[cols].T over the same grid
(rows in BLOCK_M steps from 0, columns in BLOCK_N steps), accumulated in float32 over D
in BLOCK_K chunks, whichever axis a kernel reduces: the row and column softmaxes, and
their backward passes, see bit-identical scores. The logit is s * S_ij (+ bias).
Row i's positive pair is column i + diag_offset (also i - diag_offset with BOTH_WAYS,
NT-Xent's two views); column i + mask_offset is left out (NT-Xent's self-similarity).
An offset outside (-M, N) means "no such pair in this block", as when ranks pass blocks
around. SCALE and BIAS are float32 scalars read on the device (no host sync).

Forward:
    _softmax_lse_rows_kernel  lse_i = log sum_j exp(s S_ij) (online) as two numbers, the
                              max and the log-sum, and the positive pair's logit
    _softmax_lse_cols_kernel  the same per column j
    _sigmoid_rows_kernel      r_i = sum_j softplus(-y_ij (s S_ij + bias)), y = +1 on the
                              positive pair, -1 elsewhere

Backward, G' the loss gradient per logit up to a constant c (KIND):
    clip     G'_ij = exp(s S_ij - lse_r_i) + exp(s S_ij - lse_c_j) - 2 [positive]
    rows     G'_ij = exp(s S_ij - lse_r_i) - [positive]          (NT-Xent; X = Y)
    (lse kept as (max, log-sum): exp((s S_ij - max) - log-sum), exact at huge logits)
    sigmoid  G'_ij = -y_ij sigmoid(-y_ij (s S_ij + bias))
    _bwd_rows_kernel  dx_i = c s sum_j G'_ij y_j   (a program per BLOCK_M rows x BLOCK_DO
                      dims), ds = c sum_ij G'_ij S_ij, dbias = c sum_ij G'_ij (partials)
    _bwd_cols_kernel  dy_j = c s sum_i G'_ij x_i
G' lies in [-2, 2] and is rounded to the feature dtype for the tile matmul; c (1/2B or
1/B times the upstream gradient) scales the float32 accumulator, so small per-pair
gradients never underflow in fp16. A feature dim wider than BLOCK_DO is split over
programs, each recomputing the scores (the accumulator must fit in registers).
float32 inputs use IEEE dots (no TF32).
"""

import torch
import triton
import triton.language as tl

from ._launch import dense, empty, unit_last

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def _scores(A, B, stride_a, stride_b, offs_m, offs_n, M, N, D,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            PRECISION: tl.constexpr):
    """S [BLOCK_M, BLOCK_N] = A[offs_m] . B[offs_n], float32, zero outside the blocks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = A + offs_m.to(tl.int64)[:, None] * stride_a
    b_rows = B + offs_n.to(tl.int64)[:, None] * stride_b
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[:, None] < N
    for k in range(0, D, BLOCK_K):
        k_ok = (k + offs_k)[None, :] < D
        a = tl.load(a_rows + k + offs_k[None, :], mask=m_ok & k_ok, other=0.0)
        b = tl.load(b_rows + k + offs_k[None, :], mask=n_ok & k_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return acc


@triton.jit
def _softplus(t):
    """log(1 + exp(t)), stable, with log1p's accuracy where exp(-|t|) is tiny."""
    u = tl.exp(-tl.abs(t))
    log1p_u = tl.where(u < 1e-4, u * (1.0 - 0.5 * u), tl.log(1.0 + u))
    return tl.maximum(t, 0.0) + log1p_u


@triton.jit
def _pair_masks(offs_m, offs_n, diag_offset, mask_offset, BOTH_WAYS: tl.constexpr):
    """[M, N] masks: the positive pairs and the excluded pairs of a tile."""
    diff = offs_n[None, :] - offs_m[:, None]
    positive = diff == diag_offset
    if BOTH_WAYS:  # NT-Xent: row i pairs with i + N and row i + N with i
        positive |= diff == -diag_offset
    return positive, diff == mask_offset


@triton.jit
def _softmax_lse_rows_kernel(
    X, Y, SCALE, STATS, POS, stride_x, stride_y, M, N, D, diag_offset, mask_offset,
    BOTH_WAYS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(SCALE)
    # The max m (in logit units) and log l are stored apart, not as lse = m + log l: at
    # logits of 1000 an fp32 lse is off by 6e-5, and exp(logit - lse) with it. With them
    # apart, the backward's exp((logit - m) - log l) and the loss (m - positive) + log l
    # keep full precision however large the logits are.
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n in range(0, N, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        s = _scores(X, Y, stride_x, stride_y, offs_m, offs_n, M, N, D,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale
        positive, excluded = _pair_masks(offs_m, offs_n, diag_offset, mask_offset, BOTH_WAYS)
        s = tl.where((offs_n[None, :] < N) & ~excluded, s, float("-inf"))
        pos += tl.sum(tl.where(positive & (offs_n[None, :] < N), s, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen only excluded columns keeps m = -inf: shift by 0, not NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = (l_i * tl.exp2((m_i - shift) * _LOG2E)
               + tl.sum(tl.exp2((s - shift[:, None]) * _LOG2E), axis=1))
        m_i = m_new
    tl.store(STATS + offs_m, m_i, mask=offs_m < M)
    tl.store(STATS + M + offs_m, tl.log(l_i), mask=offs_m < M)
    tl.store(POS + offs_m, pos, mask=offs_m < M)


@triton.jit
def _softmax_lse_cols_kernel(
    X, Y, SCALE, STATS, POS, stride_x, stride_y, M, N, D, diag_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Same tiles as the rows kernel (rows of X in BLOCK_M steps from 0), reduced over
    # the other axis: the backward then sees bit-identical scores in both softmaxes.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    scale = tl.load(SCALE)
    m_j = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l_j = tl.zeros((BLOCK_N,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m in range(0, M, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        s = _scores(X, Y, stride_x, stride_y, offs_m, offs_n, M, N, D,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale
        s = tl.where(offs_m[:, None] < M, s, float("-inf"))
        positive = offs_n[None, :] - offs_m[:, None] == diag_offset
        pos += tl.sum(tl.where(positive & (offs_m[:, None] < M), s, 0.0), axis=0)
        m_new = tl.maximum(m_j, tl.max(s, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_j = (l_j * tl.exp2((m_j - shift) * _LOG2E)
               + tl.sum(tl.exp2((s - shift[None, :]) * _LOG2E), axis=0))
        m_j = m_new
    tl.store(STATS + offs_n, m_j, mask=offs_n < N)
    tl.store(STATS + N + offs_n, tl.log(l_j), mask=offs_n < N)
    tl.store(POS + offs_n, pos, mask=offs_n < N)


@triton.jit
def _sigmoid_rows_kernel(
    X, Y, SCALE, BIAS, ROWS, stride_x, stride_y, M, N, D, diag_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n in range(0, N, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        z = _scores(X, Y, stride_x, stride_y, offs_m, offs_n, M, N, D,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale + bias
        positive = offs_n[None, :] == offs_m[:, None] + diag_offset
        loss = _softplus(tl.where(positive, -z, z))
        total += tl.sum(tl.where(offs_n[None, :] < N, loss, 0.0), axis=1)
    tl.store(ROWS + offs_m, total, mask=offs_m < M)


@triton.jit
def _grad_tile(X, Y, stride_x, stride_y, offs_m, offs_n, M, N, D, scale, bias,
               STATS_R, STATS_C, diag_offset, mask_offset,
               KIND: tl.constexpr, BOTH_WAYS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr):
    """G' of one [BLOCK_M, BLOCK_N] tile, zero outside the problem and on excluded pairs."""
    m_ok = offs_m < M
    n_ok = offs_n < N
    s = _scores(X, Y, stride_x, stride_y, offs_m, offs_n, M, N, D,
                BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale
    positive, excluded = _pair_masks(offs_m, offs_n, diag_offset, mask_offset, BOTH_WAYS)
    if KIND == 2:  # sigmoid: -y sigmoid(-y z) is sigmoid(z) - 1 on a positive, sigmoid(z) elsewhere
        sig = tl.sigmoid(s + bias)
        g = tl.where(positive, sig - 1.0, sig)
    else:
        # Masked lanes load a max of +inf, so exp() gives 0 there rather than overflowing.
        max_r = tl.load(STATS_R + offs_m, mask=m_ok, other=float("inf"))
        logl_r = tl.load(STATS_R + M + offs_m, mask=m_ok, other=0.0)
        g = tl.exp((s - max_r[:, None]) - logl_r[:, None])
        if KIND == 0:  # both softmaxes (CLIP)
            max_c = tl.load(STATS_C + offs_n, mask=n_ok, other=float("inf"))
            logl_c = tl.load(STATS_C + N + offs_n, mask=n_ok, other=0.0)
            g = g + tl.exp((s - max_c[None, :]) - logl_c[None, :])
            g = tl.where(positive, g - 2.0, g)
        else:  # the row softmax only (NT-Xent)
            g = tl.where(positive, g - 1.0, g)
    return tl.where(m_ok[:, None] & n_ok[None, :] & ~excluded, g, 0.0)


@triton.jit
def _bwd_rows_kernel(
    X, Y, SCALE, BIAS, STATS_R, STATS_C, COEF, DX, DS_PARTIAL, DBIAS_PARTIAL,
    stride_x, stride_y, stride_dx, M, N, D, diag_offset, mask_offset,
    KIND: tl.constexpr, BOTH_WAYS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    m_ok = offs_m < M
    do_ok = offs_do < D
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    g_total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n in range(0, N, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        g = _grad_tile(X, Y, stride_x, stride_y, offs_m, offs_n, M, N, D, scale, bias,
                       STATS_R, STATS_C, diag_offset, mask_offset, KIND, BOTH_WAYS,
                       BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        g_total += tl.sum(g, axis=1)
        y = tl.load(Y + offs_n.to(tl.int64)[:, None] * stride_y + offs_do[None, :],
                    mask=(offs_n < N)[:, None] & do_ok[None, :], other=0.0)
        acc += tl.dot(g.to(y.dtype), y, input_precision=PRECISION)

    coef_dx = tl.load(COEF)      # c * s
    coef = tl.load(COEF + 1)     # c
    tile_ok = m_ok[:, None] & do_ok[None, :]
    x = tl.load(X + offs_m.to(tl.int64)[:, None] * stride_x + offs_do[None, :],
                mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(DX + offs_m.to(tl.int64)[:, None] * stride_dx + offs_do[None, :],
             (acc * coef_dx).to(DX.dtype.element_ty), mask=tile_ok)
    partial = pid_m * tl.num_programs(1) + pid_d
    tl.store(DS_PARTIAL + partial, tl.sum(tl.sum(x * acc, axis=1), axis=0) * coef)
    tl.store(DBIAS_PARTIAL + partial, tl.sum(g_total, axis=0) * coef)


@triton.jit
def _bwd_cols_kernel(
    X, Y, SCALE, BIAS, STATS_R, STATS_C, COEF, DY,
    stride_x, stride_y, stride_dy, M, N, D, diag_offset, mask_offset,
    KIND: tl.constexpr, BOTH_WAYS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for m in range(0, M, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        g = _grad_tile(X, Y, stride_x, stride_y, offs_m, offs_n, M, N, D, scale, bias,
                       STATS_R, STATS_C, diag_offset, mask_offset, KIND, BOTH_WAYS,
                       BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        x = tl.load(X + offs_m.to(tl.int64)[:, None] * stride_x + offs_do[None, :],
                    mask=(offs_m < M)[:, None] & do_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(g.to(x.dtype)), x, input_precision=PRECISION)
    tl.store(DY + offs_n.to(tl.int64)[:, None] * stride_dy + offs_do[None, :],
             (acc * tl.load(COEF)).to(DY.dtype.element_ty),
             mask=(offs_n < N)[:, None] & do_ok[None, :])


@triton.jit
def _count_above_kernel(
    X, Y, THRESHOLD, COUNT, stride_x, stride_y, M, N, D,
    COLUMNS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per row (per column with COLUMNS) of S = X @ Y.T, how many scores exceed its
    threshold: a retrieval rank, given the positive pair's score as the threshold."""
    own = tl.program_id(0) * (BLOCK_N if COLUMNS else BLOCK_M)
    if COLUMNS:
        offs_n = own + tl.arange(0, BLOCK_N)
        threshold = tl.load(THRESHOLD + offs_n, mask=offs_n < N, other=0.0)
        count = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for m in range(0, M, BLOCK_M):
            offs_m = m + tl.arange(0, BLOCK_M)
            s = _scores(X, Y, stride_x, stride_y, offs_m, offs_n, M, N, D,
                        BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            above = (s > threshold[None, :]) & (offs_m[:, None] < M)
            count += tl.sum(above.to(tl.int32), axis=0)
        tl.store(COUNT + offs_n, count, mask=offs_n < N)
    else:
        offs_m = own + tl.arange(0, BLOCK_M)
        threshold = tl.load(THRESHOLD + offs_m, mask=offs_m < M, other=0.0)
        count = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for n in range(0, N, BLOCK_N):
            offs_n = n + tl.arange(0, BLOCK_N)
            s = _scores(X, Y, stride_x, stride_y, offs_m, offs_n, M, N, D,
                        BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            above = (s > threshold[:, None]) & (offs_n[None, :] < N)
            count += tl.sum(above.to(tl.int32), axis=1)
        tl.store(COUNT + offs_m, count, mask=offs_m < M)


# ---- launchers -------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    # IEEE float32 dots for float32 inputs: TF32 would be less accurate than the reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(m: int, n: int, d: int, device: torch.device) -> dict:
    """Tile sizes. The interpreter pays per tile, not per element: 16-row tiles for tiny
    problems (several tiles and a ragged tail), 128 beyond."""
    if device.type != "cuda":
        block = 16 if max(m, n) <= 64 else 128
        return {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": min(64, max(16, triton.next_power_of_2(d)))}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def _scalar(t: torch.Tensor, device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=torch.float32).reshape(())


KINDS = {"clip": 0, "rows": 1, "sigmoid": 2}


def _offset(offset, n: int) -> int:
    # Column i + n is never a column: "no such pair in this block".
    return n if offset is None else int(offset)


def softmax_lse_rows(x, y, scale, diag_offset=None, mask_offset=None, both_ways=False):
    """(stats [2, M], pos [M]) float32: the softmax statistics of row i of the logits
    s x @ y.T leaving out column i + mask_offset, max (-inf when N == 0) and log of the
    sum of exp(logit - max), so that lse = max + log-sum; and the logit of row i's
    positive pair, column i + diag_offset (also i - diag_offset with ``both_ways``;
    0 when there is none)."""
    x, y = unit_last(x), unit_last(y)  # rows read with unit stride
    M, D = x.shape
    N = y.shape[0]
    stats = empty((2, M), dtype=torch.float32, device=x.device)
    pos = empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return stats, pos
    if N == 0:
        stats[0].fill_(float("-inf"))
        stats[1].zero_()
        return stats, pos.zero_()
    cfg = _blocks(M, N, D, x.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _softmax_lse_rows_kernel[grid](x, y, _scalar(scale, x.device), stats, pos, x.stride(0), y.stride(0),
                                   M, N, D, _offset(diag_offset, N), _offset(mask_offset, N),
                                   BOTH_WAYS=both_ways, PRECISION=_precision(x.dtype), **cfg)
    return stats, pos


def softmax_lse_cols(x, y, scale, diag_offset=None):
    """(stats [2, N], pos [N]): the same over column j of the logits s x @ y.T, from the
    same score tiles as :func:`softmax_lse_rows`."""
    x, y = unit_last(x), unit_last(y)  # rows read with unit stride
    M, D = x.shape
    N = y.shape[0]
    stats = empty((2, N), dtype=torch.float32, device=x.device)
    pos = empty((N,), dtype=torch.float32, device=x.device)
    if N == 0:
        return stats, pos
    if M == 0:
        stats[0].fill_(float("-inf"))
        stats[1].zero_()
        return stats, pos.zero_()
    cfg = _blocks(M, N, D, x.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    _softmax_lse_cols_kernel[grid](x, y, _scalar(scale, x.device), stats, pos, x.stride(0), y.stride(0),
                                   M, N, D, _offset(diag_offset, N), PRECISION=_precision(x.dtype), **cfg)
    return stats, pos


def sigmoid_rows(x, y, scale, bias, diag_offset=None) -> torch.Tensor:
    """[M] float32: per row, the sum over the columns of softplus(-y_ij (s x_i.y_j + bias))."""
    x, y = unit_last(x), unit_last(y)  # rows read with unit stride
    M, D = x.shape
    N = y.shape[0]
    rows = empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return rows
    if N == 0:
        return rows.zero_()
    cfg = _blocks(M, N, D, x.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _sigmoid_rows_kernel[grid](x, y, _scalar(scale, x.device), _scalar(bias, x.device), rows,
                               x.stride(0), y.stride(0), M, N, D, _offset(diag_offset, N),
                               PRECISION=_precision(x.dtype), **cfg)
    return rows


def _block_do(d: int, device, widest: int = 256) -> int:
    return max(16, min(triton.next_power_of_2(d), widest if device.type == "cuda" else 64))


# The rows kernel also holds x for ds: at BLOCK_DO = 256 its float32 accumulator spilled
# on sm_90a (96-120 B/thread at 255 registers); 128 halves it, for twice the score
# recomputation over a wide feature dim. The columns kernel fits 256 (~245 registers).
_ROWS_BLOCK_DO = 128


def _common(x, y, scale, bias, stats_r, stats_c, coef):
    coef = dense(coef)
    scale32 = _scalar(scale, x.device)
    placeholder = scale32.reshape(1)
    return (x, y, scale32, _scalar(bias, x.device) if bias is not None else scale32,
            stats_r.contiguous() if stats_r is not None else placeholder,
            stats_c.contiguous() if stats_c is not None else placeholder, coef)


def contrastive_bwd_rows(x, y, scale, bias, stats_r, stats_c, coef, diag_offset, mask_offset,
                         kind: str, both_ways: bool, out_dtype: torch.dtype):
    """dX [M, D] (``out_dtype``) and the float32 scalars ds and dbias of this block pair.

    ``coef`` is a float32 tensor [c * s, c] (c: upstream gradient / normaliser); ``kind``
    "clip" (both softmaxes: needs ``lse_r`` [M] and ``lse_c`` [N]), "rows" (the row
    softmax only: ``lse_r``) or "sigmoid" (needs ``bias``). Offsets of None mean no
    positive (no excluded) pair in this block.
    """
    x, y = unit_last(x), unit_last(y)  # rows read with unit stride
    M, D = x.shape
    N = y.shape[0]
    device = x.device
    dx = empty((M, D), dtype=out_dtype, device=device)
    if M == 0 or N == 0 or D == 0:
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return dx.zero_(), zero, zero.clone()
    cfg = _blocks(M, N, D, device)
    block_do = _block_do(D, device, _ROWS_BLOCK_DO)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D, block_do))
    ds_partial = empty((grid[0] * grid[1],), dtype=torch.float32, device=device)
    db_partial = empty((grid[0] * grid[1],), dtype=torch.float32, device=device)
    _bwd_rows_kernel[grid](
        *_common(x, y, scale, bias, stats_r, stats_c, coef), dx, ds_partial, db_partial,
        x.stride(0), y.stride(0), dx.stride(0), M, N, D,
        _offset(diag_offset, N), _offset(mask_offset, N),
        KIND=KINDS[kind], BOTH_WAYS=both_ways, BLOCK_DO=block_do, PRECISION=_precision(x.dtype), **cfg,
    )
    # Every d-chunk program sees the same G' tiles: the bias gradient comes from chunk 0.
    db = db_partial.view(grid[0], grid[1])[:, 0].sum()
    return dx, ds_partial.sum(), db


def contrastive_bwd_cols(x, y, scale, bias, stats_r, stats_c, coef, diag_offset, mask_offset,
                         kind: str, both_ways: bool, out_dtype: torch.dtype):
    """dY [N, D]: dy_j = c s sum_i G'_ij x_i, from the same score tiles as the rows kernel."""
    x, y = unit_last(x), unit_last(y)  # rows read with unit stride
    M, D = x.shape
    N = y.shape[0]
    device = x.device
    dy = empty((N, D), dtype=out_dtype, device=device)
    if M == 0 or N == 0 or D == 0:
        return dy.zero_()
    cfg = _blocks(M, N, D, device)
    block_do = _block_do(D, device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(D, block_do))
    _bwd_cols_kernel[grid](
        *_common(x, y, scale, bias, stats_r, stats_c, coef), dy,
        x.stride(0), y.stride(0), dy.stride(0), M, N, D,
        _offset(diag_offset, N), _offset(mask_offset, N),
        KIND=KINDS[kind], BOTH_WAYS=both_ways, BLOCK_DO=block_do, PRECISION=_precision(x.dtype), **cfg,
    )
    return dy


def count_above(x, y, threshold, columns: bool) -> torch.Tensor:
    """int32 [M] (or [N] with ``columns``): scores of x @ y.T above each row's (column's)
    threshold, over the same score tiles as the loss kernels."""
    x, y = unit_last(x), unit_last(y)  # rows read with unit stride
    M, D = x.shape
    N = y.shape[0]
    count = torch.zeros((N if columns else M,), dtype=torch.int32, device=x.device)
    if M == 0 or N == 0:
        return count
    cfg = _blocks(M, N, D, x.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) if columns else triton.cdiv(M, cfg["BLOCK_M"]),)
    _count_above_kernel[grid](x, y, threshold.float().contiguous(), count, x.stride(0), y.stride(0),
                              M, N, D, COLUMNS=columns, PRECISION=_precision(x.dtype), **cfg)
    return count
