"""Triton kernels for attention with a decomposed 2D relative-position bias (SAM's image
encoder: MViTv2's decomposed bias), flash-attention style: the N x N bias is never formed.

Layout (padded, as mmfast.ops.attention): Q [B, Tq, H, D], K/V [B, Tk, H, D], the bias
pieces RH [B, Tq, H, KH] and RW [B, Tq, H, KW] over a key grid of KH rows and KW columns
(Tk = KH * KW, key j at row j // KW, column j % KW); every tensor read through its strides
(last dim contiguous). Scores, for query i and key j:

    s_ij = scale q_i . k_j + RH[i, j // KW] + RW[i, j % KW]

Forward (one program per BLOCK_M queries of one head of one batch entry): the online
softmax of attention.py in float32, in natural units (exp(s - m), as eager softmax
computes it); each score tile adds its bias by a gather from the query rows' RH / RW
entries (masked loads: L1/L2-resident rows of KH + KW numbers per query, not an N x N
tensor). Writes out and, for the backward, STATS [2, B, H, Tq]: the row max m and 1 / l
(l the row sum of exp(s - m)) rather than one log-sum-exp, so that the backward's
p = exp(s - m) / l never subtracts a large rounded lse (float32 spacing 4e-6 at 32: with
SAM's scores, |s| ~ 10-20, that would shift every recomputed p).

Where the key grid is exactly BLOCK_N keys wide (SAM's 64 x 64 global grid on a GPU), every
key block is one grid row (WHOLE_ROWS): its rel_w term is a tile of the query rows' RW
(the same for every block: loaded once in the forward) plus one RH column, and the dq
kernel adds ds itself to dRW and its row sums to dRH's column, in float32, without the
one-hot dots below.

Backward (deterministic, no atomics), with p as above, delta = rowsum(dO * O):
    dv = sum_q p dO,  dp = dO.v,  ds = p (dp - delta)
    dk = scale sum_q ds q          (_attention_rel_pos_bwd_dkdv_kernel: per key block)
    dq = scale sum_k ds k          (_attention_rel_pos_bwd_dq_kernel: per query block,
    dRH[i, g] = sum_{j // KW = g} ds_ij,  dRW[i, g] = sum_{j % KW = g} ds_ij
                                    which also owns the rows of dRH, dRW: reduced over the
                                    key blocks by dots of ds with one-hot [keys, KH] / [keys,
                                    KW] tiles, so they run on tensor cores like dq)
The dq kernel runs first and writes delta for the dk/dv kernel (no preprocess launch).

The head dim is one power-of-two tile (BLOCK_D >= D, columns >= D masked): SAM's is 64.
Every index is masked (rows < Tq, keys < Tk, grid row < KH), so no load leaves a tensor
whatever the sizes. float32 inputs use IEEE dots (no TF32).
"""

import torch
import triton
import triton.language as tl

from ._launch import empty, unit_last


# The widest key grid the kernels take (BLOCK_GH, BLOCK_GW up to this): the dq kernel keeps
# [BLOCK_M, side] accumulators for dRH and dRW. SAM at 1024 px: 64 x 64 (global layers).
MAX_GRID_SIDE = 64


@triton.jit
def _bias(RH_rows, RW_rows, cols, key_w, key_h, ok):
    """[M, N] float32: RH[i, j // KW] + RW[i, j % KW] for query rows (pointer column
    vectors RH_rows, RW_rows [M, 1]) and keys ``cols`` [N]; 0 where not ``ok``."""
    jh = cols // key_w
    jw = cols - jh * key_w
    ok = ok & (jh < key_h)[None, :]
    bias = tl.load(RH_rows + jh[None, :], mask=ok, other=0.0).to(tl.float32)
    return bias + tl.load(RW_rows + jw[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _row_column(RH_rows, jh, key_h, m_ok):
    """[M, 1] float32: RH[i, jh] for query rows (pointer column vector RH_rows [M, 1]),
    the rel_h term of a key block that lies in grid row ``jh`` (WHOLE_ROWS)."""
    ok = m_ok & ((m_ok.to(tl.int32) * 0 + jh) < key_h)  # (jh a Python int under the interpreter)
    return tl.load(RH_rows + jh, mask=ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _rw_tile(RW_rows, offs_n, m_ok):
    """[M, N] float32: RW[i, g] for query rows (pointer column vector RW_rows [M, 1]) and
    grid columns ``offs_n`` [N]: the rel_w term of every key block (WHOLE_ROWS)."""
    return tl.load(RW_rows + offs_n[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _block_bias(RH_rows, RW_rows, rw, cols, block_row, key_w, key_h, m_ok, ok, WHOLE_ROWS: tl.constexpr):
    """[M, N] float32: the bias of the key block ``cols`` [N] for query rows (pointer column
    vectors RH_rows, RW_rows [M, 1]), 0 where not ``ok`` [M, N]. WHOLE_ROWS: the block is
    grid row ``block_row``, ``rw`` its rel_w tile (:func:`_rw_tile`; the caller chooses
    where to load it); otherwise ``rw`` is None and the bias is gathered (:func:`_bias`)."""
    if WHOLE_ROWS:
        bias = rw + _row_column(RH_rows, block_row, key_h, m_ok)
    else:
        bias = _bias(RH_rows, RW_rows, cols, key_w, key_h, ok)
    return bias


@triton.jit
def _bias_t(RH_cols, RW_cols, keys, key_w, key_h, ok_t):
    """The transpose of :func:`_bias`: [N, M] for keys ``keys`` [N] and query pointer row
    vectors RH_cols, RW_cols [1, M]."""
    jh = keys // key_w
    jw = keys - jh * key_w
    ok_t = ok_t & (jh < key_h)[:, None]
    bias = tl.load(RH_cols + jh[:, None], mask=ok_t, other=0.0).to(tl.float32)
    return bias + tl.load(RW_cols + jw[:, None], mask=ok_t, other=0.0).to(tl.float32)


@triton.jit
def _attention_rel_pos_fwd_kernel(
    Q, K, V, RH, RW, O, STATS,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_hb, stride_ht, stride_hh,
    stride_wb, stride_wt, stride_wh,
    stride_ob, stride_ot, stride_oh,
    stride_sb, stride_sh, plane,
    seqlen_q, seqlen_k, key_h, key_w, head_dim, scale,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WHOLE_ROWS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < head_dim
    rows = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qt + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    RH_rows = RH + b * stride_hb + h * stride_hh + rows * stride_ht
    RW_rows = RW + b * stride_wb + h * stride_wh + rows * stride_wt
    K_head = K + b * stride_kb + h * stride_kh
    V_head = V + b * stride_vb + h * stride_vh
    rw = None
    if WHOLE_ROWS:  # every key block is one grid row: its rel_w tile is the same for all
        rw = _rw_tile(RW_rows, offs_n, m_ok)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < seqlen_k
        keys = cols.to(tl.int64)[:, None]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K_head + keys * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        bias = _block_bias(RH_rows, RW_rows, rw, cols, start_n // BLOCK_N, key_w, key_h, m_ok,
                           m_ok[:, None] & n_ok[None, :], WHOLE_ROWS)
        s = tl.where(n_ok[None, :], s * scale + bias, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_head + keys * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Every query sees at least one key (Tk >= 1): l >= 1.
    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    # The row max and the reciprocal row sum (see the module docstring).
    at = b * stride_sb + h * stride_sh + offs_m
    tl.store(STATS + at, m_i, mask=m_ok)
    tl.store(STATS + plane + at, 1.0 / l_i, mask=m_ok)


@triton.jit
def _attention_rel_pos_bwd_dq_kernel(
    Q, K, V, O, DO, STATS, DELTA, RH, RW, DQ, DRH, DRW,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_hb, stride_ht, stride_hh,
    stride_wb, stride_wt, stride_wh,
    stride_sb, stride_sh, plane,
    seqlen_q, seqlen_k, key_h, key_w, head_dim, scale,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_GH: tl.constexpr, BLOCK_GW: tl.constexpr, WHOLE_ROWS: tl.constexpr,
):
    """dq, dRH, dRW for BLOCK_M query rows; also writes delta = rowsum(dO * O) for them.
    DQ has q's shape, DRH / DRW those of RH / RW, all contiguous."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    heads = tl.num_programs(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_gh = tl.arange(0, BLOCK_GH)
    offs_gw = tl.arange(0, BLOCK_GW)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < head_dim
    rows = offs_m.to(tl.int64)[:, None]
    row_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qt + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dot + offs_d[None, :], mask=row_mask, other=0.0)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :], mask=row_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stats_at = b * stride_sb + h * stride_sh + offs_m
    tl.store(DELTA + stats_at, delta, mask=m_ok)
    row_max = tl.load(STATS + stats_at, mask=m_ok, other=0.0)
    inv_sum = tl.load(STATS + plane + stats_at, mask=m_ok, other=0.0)
    RH_rows = RH + b * stride_hb + h * stride_hh + rows * stride_ht
    RW_rows = RW + b * stride_wb + h * stride_wh + rows * stride_wt
    K_head = K + b * stride_kb + h * stride_kh
    V_head = V + b * stride_vb + h * stride_vh

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    drh = tl.zeros((BLOCK_M, BLOCK_GH), dtype=tl.float32)
    drw = tl.zeros((BLOCK_M, BLOCK_GW), dtype=tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < seqlen_k
        keys = cols.to(tl.int64)[:, None]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K_head + keys * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_head + keys * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        ok = m_ok[:, None] & n_ok[None, :]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        rw = None
        if WHOLE_ROWS:  # the rel_w tile, loaded per key block here
            rw = _rw_tile(RW_rows, offs_n, m_ok)
        s = s * scale + _block_bias(RH_rows, RW_rows, rw, cols, start_n // BLOCK_N, key_w, key_h, m_ok, ok, WHOLE_ROWS)
        p = tl.where(ok, tl.exp(s - row_max[:, None]) * inv_sum[:, None], 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds32 = p * (dp - delta[:, None])
        ds = ds32.to(k.dtype)
        dq += tl.dot(ds, k, input_precision=PRECISION)
        if WHOLE_ROWS:
            # The block is grid row jh: dRW gets ds itself (column g = key g of the block),
            # dRH column jh its row sums; float32, no dots.
            drw += ds32
            drh += tl.where(offs_gh[None, :] == start_n // BLOCK_N, tl.sum(ds32, 1)[:, None], 0.0)
        else:
            # Scatter-adds of ds over the key grid's rows and columns, as dots with one-hot
            # [keys, grid side] tiles (exact: one nonzero term per product).
            jh = cols // key_w
            jw = cols - jh * key_w
            onehot_h = (jh[:, None] == offs_gh[None, :]).to(k.dtype)
            onehot_w = (jw[:, None] == offs_gw[None, :]).to(k.dtype)
            drh += tl.dot(ds, onehot_h, input_precision=PRECISION)
            drw += tl.dot(ds, onehot_w, input_precision=PRECISION)

    dq_at = ((b * seqlen_q + rows) * heads + h) * head_dim + offs_d[None, :]
    tl.store(DQ + dq_at, (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)
    drh_at = ((b * seqlen_q + rows) * heads + h) * key_h + offs_gh[None, :]
    tl.store(DRH + drh_at, drh.to(DRH.dtype.element_ty), mask=m_ok[:, None] & (offs_gh < key_h)[None, :])
    drw_at = ((b * seqlen_q + rows) * heads + h) * key_w + offs_gw[None, :]
    tl.store(DRW + drw_at, drw.to(DRW.dtype.element_ty), mask=m_ok[:, None] & (offs_gw < key_w)[None, :])


@triton.jit
def _attention_rel_pos_bwd_dkdv_kernel(
    Q, K, V, DO, STATS, DELTA, RH, RW, DK, DV,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_hb, stride_ht, stride_hh,
    stride_wb, stride_wt, stride_wh,
    stride_sb, stride_sh, plane,
    seqlen_q, seqlen_k, key_h, key_w, head_dim, scale,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WHOLE_ROWS: tl.constexpr,
):
    """dk, dv for BLOCK_N keys, over every query block; transposed [keys, queries] tiles so
    that p^T and ds^T feed the dots without a register transpose. DK, DV contiguous."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    heads = tl.num_programs(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seqlen_k
    d_ok = offs_d < head_dim
    keys = offs_n.to(tl.int64)[:, None]
    key_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + keys * stride_kt + offs_d[None, :], mask=key_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + keys * stride_vt + offs_d[None, :], mask=key_mask, other=0.0)
    Q_head = Q + b * stride_qb + h * stride_qh
    DO_head = DO + b * stride_dob + h * stride_doh
    RH_head = RH + b * stride_hb + h * stride_hh
    RW_head = RW + b * stride_wb + h * stride_wh
    L_head = b * stride_sb + h * stride_sh

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, seqlen_q, BLOCK_M):
        rows = start_m + offs_m
        m_ok = rows < seqlen_q
        rows64 = rows.to(tl.int64)
        row_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q_head + rows64[:, None] * stride_qt + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(DO_head + rows64[:, None] * stride_dot + offs_d[None, :], mask=row_mask, other=0.0)
        row_max = tl.load(STATS + L_head + rows, mask=m_ok, other=0.0)
        inv_sum = tl.load(STATS + plane + L_head + rows, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + L_head + rows, mask=m_ok, other=0.0)
        ok_t = n_ok[:, None] & m_ok[None, :]
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        if WHOLE_ROWS:  # keys of grid row pid_n: columns 0..BLOCK_N-1 of rel_w, one rel_h entry
            rw_t = tl.load(RW_head + rows64[None, :] * stride_wt + tl.arange(0, BLOCK_N)[:, None],
                           mask=ok_t, other=0.0).to(tl.float32)
            rh = tl.load(RH_head + rows64 * stride_ht + pid_n, mask=m_ok & ((rows * 0 + pid_n) < key_h), other=0.0)
            bias_t = rw_t + rh.to(tl.float32)[None, :]
        else:
            bias_t = _bias_t(RH_head + rows64[None, :] * stride_ht, RW_head + rows64[None, :] * stride_wt,
                             offs_n, key_w, key_h, ok_t)
        s_t = s_t * scale + bias_t
        p_t = tl.where(ok_t, tl.exp(s_t - row_max[None, :]) * inv_sum[None, :], 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q, input_precision=PRECISION)

    at = ((b * seqlen_k + keys) * heads + h) * head_dim + offs_d[None, :]
    tl.store(DK + at, (dk * scale).to(DK.dtype.element_ty), mask=key_mask)
    tl.store(DV + at, dv.to(DV.dtype.element_ty), mask=key_mask)


# ---- launchers -------------------------------------------------------------------------


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, T, H, X] tensor (last dim contiguous)."""
    return t.stride(0), t.stride(1), t.stride(2)


def _precision(dtype: torch.dtype) -> str:
    # IEEE float32 dots for float32 inputs: TF32 would be less accurate than the reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(device: torch.device, block_d: int, kernel: str, key_w: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel "fwd", "dq" or "dkdv". Picked so
    that none spills on sm_90a at head dim 64 (mmfast.compile_gate) and every dot has at
    least 64 rows (wgmma); untimed, to be tuned on a GPU. BLOCK_N = 64 makes the key blocks
    of SAM's 64 x 64 global grid whole grid rows (WHOLE_ROWS). The interpreter gets 32-row
    tiles (it runs them in numpy, where each tile costs Python overhead; SAM's 196-token
    windows still span 7 of them, partial last one included), and key blocks of one grid
    row where the grid is 16 or 32 keys wide, so that CPU tests reach both paths."""
    if device.type != "cuda":
        return 32, (key_w if key_w in (16, 32) else 32), 1, 1
    if kernel == "fwd":
        return (128, 64, 8, 3) if block_d <= 64 else (128, 32, 8, 2)
    # 8 warps for both backward kernels: at 4, dq spilled beside its [BLOCK_M, 64] dRH and dRW
    # accumulators at 64 x 64 grids, and dK/dV spilled 56 B under triton 3.6 (SAM's 14 x 14
    # windows, 255 registers).
    return (64, 64, 8, 2) if block_d <= 64 else (64, 32, 8, 1)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _block_side(side: int) -> int:
    return max(16, triton.next_power_of_2(side))


def _whole_rows(key_w: int, block_n: int) -> bool:
    """Whether every key block is exactly one grid row (the kernels' WHOLE_ROWS path)."""
    return key_w == block_n


def attention_rel_pos_fwd(q, k, v, rel_h, rel_w, scale: float):
    """Launch the forward kernel. q [B, Tq, H, D], k, v [B, Tk, H, D], rel_h [B, Tq, H, KH],
    rel_w [B, Tq, H, KW] with Tk = KH * KW >= 1 (the op layer checks); any strides (a
    last dim that is not contiguous is copied). Returns (out like q, contiguous; the
    softmax statistics for :func:`attention_rel_pos_bwd`: float32 [2, B, H, Tq], the row
    max m of the scores and 1 / sum_j exp(s_ij - m))."""
    q, k, v, rel_h, rel_w = (unit_last(t) for t in (q, k, v, rel_h, rel_w))
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    out = empty(q.shape, dtype=q.dtype, device=q.device)
    stats = empty((2, batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, stats
    block_d = _block_d(head_dim)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _blocks(q.device, block_d, "fwd", rel_w.shape[-1])
    _attention_rel_pos_fwd_kernel[(triton.cdiv(seqlen_q, BLOCK_M), batch, heads)](
        q, k, v, rel_h, rel_w, out, stats,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(rel_h), *_strides3(rel_w), *_strides3(out),
        stats.stride(1), stats.stride(2), stats.stride(0),
        seqlen_q, seqlen_k, rel_h.shape[-1], rel_w.shape[-1], head_dim, scale,
        PRECISION=_precision(q.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        WHOLE_ROWS=_whole_rows(rel_w.shape[-1], BLOCK_N), num_warps=num_warps, num_stages=num_stages,
    )
    return out, stats


def attention_rel_pos_bwd(do, q, k, v, rel_h, rel_w, out, stats, scale: float):
    """Launch the backward kernels (dq with dRH, dRW and delta first, then dK/dV). Returns
    (dq, dk, dv, drel_h, drel_w) in the shapes and dtypes of q, k, v, rel_h, rel_w."""
    do, q, k, v, rel_h, rel_w, out = (unit_last(t) for t in (do, q, k, v, rel_h, rel_w, out))
    stats = stats.contiguous()
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    key_h, key_w = rel_h.shape[-1], rel_w.shape[-1]
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=k.device)
    dv = empty(v.shape, dtype=v.dtype, device=v.device)
    drel_h = empty(rel_h.shape, dtype=rel_h.dtype, device=q.device)
    drel_w = empty(rel_w.shape, dtype=rel_w.dtype, device=q.device)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_(), drel_h, drel_w
    delta = empty(stats.shape[1:], dtype=torch.float32, device=q.device)
    block_d = _block_d(head_dim)
    common = (*_strides3(rel_h), *_strides3(rel_w), stats.stride(1), stats.stride(2), stats.stride(0),
              seqlen_q, seqlen_k, key_h, key_w, head_dim, scale)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _blocks(q.device, block_d, "dq", key_w)
    _attention_rel_pos_bwd_dq_kernel[(triton.cdiv(seqlen_q, BLOCK_M), batch, heads)](
        q, k, v, out, do, stats, delta, rel_h, rel_w, dq, drel_h, drel_w,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *_strides3(do), *common,
        PRECISION=_precision(q.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        BLOCK_GH=_block_side(key_h), BLOCK_GW=_block_side(key_w), WHOLE_ROWS=_whole_rows(key_w, BLOCK_N),
        num_warps=num_warps, num_stages=num_stages,
    )
    BLOCK_M, BLOCK_N, num_warps, num_stages = _blocks(q.device, block_d, "dkdv", key_w)
    _attention_rel_pos_bwd_dkdv_kernel[(triton.cdiv(seqlen_k, BLOCK_N), batch, heads)](
        q, k, v, do, stats, delta, rel_h, rel_w, dk, dv,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *common,
        PRECISION=_precision(q.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        WHOLE_ROWS=_whole_rows(key_w, BLOCK_N), num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dk, dv, drel_h, drel_w
