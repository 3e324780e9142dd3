"""Triton kernels for cross-attention: queries over keys of another modality, with a
structured mask, the key axis split across programs, and a fused gate/residual epilogue.

Every tensor is seen as rows: Q/O/residual [rows_q, Hq, D], K/V [rows_k, Hk, D]. Segment
b holds rows cu_seqlens[b] .. cu_seqlens[b+1] (packed) or b * T .. (b + 1) * T (padded,
reshaped to rows by the op layer).

Mask (optional), flattened over rows, int32 (see mmfast.ops.cross_attention_masks):
    key_group[j]          the group (image) of key j within its sample; -1: nobody sees it
    query_first/last[i]   query i sees keys whose group is in [first, last)
    query_key_lo/hi[i]    the keys [lo, hi) of the segment that hold those groups: bounds
                          that let a block skip keys none of its queries can see

Forward, flash-decoding style: program (m, b, hk * S + s) runs the online softmax (float32,
exp2, scores in log2 units) of BLOCK_M (query, head) rows of K/V head hk's group of query
heads (GQA: each K/V tile is read once per group) over split s of the segment's keys,
    keys [s * split_size, (s + 1) * split_size) intersected with the block's mask bounds.
With S = 1 it writes the result; with S > 1 it writes a float32 partial (o_s, lse_s) and
one combine kernel merges the splits:
    lse = log sum_s exp(lse_s),  o = sum_s exp(lse_s - lse) o_s
So 32 queries over 16k keys still give enough programs to fill the GPU. A query that sees
no key gets o = 0 and lse = -inf. The epilogue (whichever kernel writes o) also writes
    out = residual + alpha[h] * o      (alpha = tanh(gate), computed by the op layer)
when a residual or alpha is given; otherwise out is o itself.

Backward (deterministic, no atomics), with dA = alpha dOut the gradient of o:
    r = rowsum(dOut * o)   (the gate's gradient is sum r over the gate's heads)
    delta = alpha r,  p = exp(scale q.k - lse),  dp = alpha (dOut . v),  ds = p (dp - delta)
    dv = alpha sum_q p dOut,  dk = scale sum_q ds q   (programs over key blocks)
    dq = scale sum_k ds k    (programs over (query, head) row blocks of a GQA group, as in
                              the forward, and key splits: float32 partials summed by the
                              launcher when S > 1)

Dropout (DROPOUT=True; attention_dropout.py) as in attention.py: every tile regenerates its
keep-mask Z from the seed; o (each split's partial too) uses p Z / (1 - p), lse the
undropped p; the backward takes dv from p Z and dp = Z alpha (dOut . v). Key loops then
start at a multiple of 4 keys (Philox serves four keys per draw; the mask hides the extra).

Head dims are tiled as in attention.py: at most two power-of-two pieces (kernels/_head_dim.py;
160 = 128 + 32, 80 = 64 + 16), summed in the dots over D, one accumulator each otherwise.
The dK/dV kernel works on transposed [keys, queries] tiles, so p^T and ds^T feed its dots
without a register transpose.
"""

import torch
import triton
import triton.language as tl

from ._head_dim import head_dim_pieces
from ._launch import dense, empty, multiprocessor_count, unit_last
from .attention import _aligned2, _dropout_args, _load_cols, _normalise, _pieces, _store_cols
from .attention_dropout import dropout_keep

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
_FAR = tl.constexpr(2**30)  # a key index past every segment


@triton.jit
def _segment_rows(CU, b, padded_len, tokens, VARLEN: tl.constexpr):
    """(first row, length) of segment b; cu_seqlens values clamped into [0, tokens] (a
    segment ending before it starts is empty), so no row index leaves the tensor."""
    if VARLEN:
        start = tl.minimum(tl.maximum(tl.load(CU + b), 0), tokens)
        length = tl.minimum(tl.maximum(tl.load(CU + b + 1), start), tokens) - start
    else:
        start = b * padded_len
        length = b * 0 + padded_len
    return start, length


@triton.jit
def _split_end(split, split_size, num_splits, len_k):
    """End of key split ``split``: the last one takes every key left, so a segment longer
    than max_seqlen_k (which sized the splits) still has all its keys seen."""
    return tl.where(split == num_splits - 1, len_k, (split + 1) * split_size)


@triton.jit
def _query_mask(Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI, rows, m_ok, HAS_MASK: tl.constexpr):
    """Per-query (first, last) group and the block's key bounds [lo, hi)."""
    if HAS_MASK:
        first = tl.load(Q_FIRST + rows, mask=m_ok, other=0)
        last = tl.load(Q_LAST + rows, mask=m_ok, other=0)
        lo = tl.min(tl.load(Q_KEY_LO + rows, mask=m_ok, other=_FAR), 0)
        hi = tl.max(tl.load(Q_KEY_HI + rows, mask=m_ok, other=0), 0)
    else:
        first = rows * 0
        last = rows * 0
        lo = 0
        hi = _FAR
    return first, last, lo, hi


@triton.jit
def _sees(first, last, KEY_GROUP, rows_k, m_ok, n_ok, HAS_MASK: tl.constexpr):
    """[M, N]: query sees key (within the segment's bounds, and by group)."""
    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_MASK:
        group = tl.load(KEY_GROUP + rows_k, mask=n_ok, other=-1)
        ok &= (group[None, :] >= first[:, None]) & (group[None, :] < last[:, None])
    return ok


@triton.jit
def _sees_t(first, last, KEY_GROUP, rows_k, m_ok, n_ok, HAS_MASK: tl.constexpr):
    """[N, M]: the transpose of _sees."""
    ok = n_ok[:, None] & m_ok[None, :]
    if HAS_MASK:
        group = tl.load(KEY_GROUP + rows_k, mask=n_ok, other=-1)
        ok &= (group[:, None] >= first[None, :]) & (group[:, None] < last[None, :])
    return ok


@triton.jit
def _write_output(O, OUT, RESIDUAL, ALPHA, o, at, h, mask, alpha_stride,
                  HAS_ALPHA: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """o -> O at offsets ``at`` (contiguous [rows, H, D]); with an epilogue also
    out = residual + alpha[h] * o -> OUT (same offsets). ``h``: each row's head."""
    tl.store(O + at, o.to(O.dtype.element_ty), mask=mask)
    if HAS_ALPHA or HAS_RESIDUAL:
        out = o
        if HAS_ALPHA:
            out = out * tl.load(ALPHA + h * alpha_stride)[:, None]
        if HAS_RESIDUAL:
            out += tl.load(RESIDUAL + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + at, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _cross_attention_fwd_block(
    pid_m, Q, K, V, O, OUT, LSE, O_PART, LSE_PART, RESIDUAL, ALPHA, CU_Q, CU_K, SEED,
    KEY_GROUP, Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    rows_q, heads, seqlen_q, seqlen_k, head_dim, group, scale_log2, split_size, num_splits,
    alpha_stride, drop_threshold, keep_scale, tokens_k,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr,
    HAS_ALPHA: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D0: tl.constexpr, HEAD_D1: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    # Row strides are multiples of ROW_ALIGN (the launcher checked): whole-vector rows.
    stride_qt, stride_qh = _aligned2(stride_qt, stride_qh, ROW_ALIGN)
    stride_kt, stride_kh = _aligned2(stride_kt, stride_kh, ROW_ALIGN)
    stride_vt, stride_vh = _aligned2(stride_vt, stride_vh, ROW_ALIGN)
    b = tl.program_id(1)
    hk = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    q_start, len_q = _segment_rows(CU_Q, b, seqlen_q, rows_q, VARLEN)
    k_start, len_k = _segment_rows(CU_K, b, seqlen_k, tokens_k, VARLEN)
    # The block's rows are (query, head) pairs of K/V head hk's group, query-major: row r is
    # query r // group of head hk * group + r % group. Each K/V tile is loaded once for the
    # whole group, and a block spans few queries, which keeps the mask bounds tight.
    m_first = pid_m * BLOCK_M
    if m_first >= len_q * group:  # past the segment (the caller loops over its blocks)
        return
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D0)  # head-dim pieces (_head_dim.py): offs_d, then the tail offs_t
    m_ok = offs_m < len_q * group
    rows = (q_start + offs_m // group).to(tl.int64)
    h = hk * group + offs_m % group
    Q_rows = Q + rows[:, None] * stride_qt + h[:, None] * stride_qh
    q = _load_cols(Q_rows, m_ok, offs_d, head_dim)
    acc = tl.zeros((BLOCK_M, HEAD_D0), dtype=tl.float32)
    if HEAD_D1 > 0:
        offs_t = HEAD_D0 + tl.arange(0, HEAD_D1)
        q1 = _load_cols(Q_rows, m_ok, offs_t, head_dim)
        acc1 = tl.zeros((BLOCK_M, HEAD_D1), dtype=tl.float32)
    first, last, lo, hi = _query_mask(Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI, rows, m_ok, HAS_MASK)
    lo = tl.maximum(lo, split * split_size)
    hi = tl.minimum(tl.minimum(hi, _split_end(split, split_size, num_splits, len_k)), len_k)
    if DROPOUT:  # tiles start at a multiple of 4 keys, for the Philox quads (the mask hides the rest)
        lo = (lo // 4) * 4
    K_head = K + hk * stride_kh
    V_head = V + hk * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < hi
        rows_k = (k_start + cols).to(tl.int64)
        k = _load_cols(K_head + rows_k[:, None] * stride_kt, n_ok, offs_d, head_dim)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if HEAD_D1 > 0:  # q.k reduces over the head dim: add the tail piece's dot
            k1 = _load_cols(K_head + rows_k[:, None] * stride_kt, n_ok, offs_t, head_dim)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
        s = s * scale_log2
        s = tl.where(_sees(first, last, KEY_GROUP, rows_k, m_ok, n_ok, HAS_MASK), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no key yet keep m = -inf; subtract 0 there to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_cols(V_head + rows_k[:, None] * stride_vt, n_ok, offs_d, head_dim)
        if DROPOUT:  # l sums every p (lse is undropped); only kept ones reach acc
            keep = dropout_keep(SEED, rows, h, start_n // 4 + tl.arange(0, BLOCK_N // 4), drop_threshold,
                                BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if HEAD_D1 > 0:  # p v produces head-dim columns: one accumulator per piece
            v1 = _load_cols(V_head + rows_k[:, None] * stride_vt, n_ok, offs_t, head_dim)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    if SPLIT:
        part = split.to(tl.int64) * rows_q + rows
        PART_rows = O_PART + (part[:, None] * heads + h[:, None]) * head_dim
        _store_cols(PART_rows, _normalise(acc, l_safe, keep_scale, DROPOUT), m_ok, offs_d, head_dim)
        if HEAD_D1 > 0:
            _store_cols(PART_rows, _normalise(acc1, l_safe, keep_scale, DROPOUT), m_ok, offs_t, head_dim)
        tl.store(LSE_PART + part * heads + h, lse, mask=m_ok)
    else:
        at = (rows[:, None] * heads + h[:, None]) * head_dim
        _write_output(O, OUT, RESIDUAL, ALPHA, _normalise(acc, l_safe, keep_scale, DROPOUT), at + offs_d[None, :],
                      h, m_ok[:, None] & (offs_d < head_dim)[None, :], alpha_stride, HAS_ALPHA, HAS_RESIDUAL)
        if HEAD_D1 > 0:
            _write_output(O, OUT, RESIDUAL, ALPHA, _normalise(acc1, l_safe, keep_scale, DROPOUT),
                          at + offs_t[None, :], h, m_ok[:, None] & (offs_t < head_dim)[None, :], alpha_stride,
                          HAS_ALPHA, HAS_RESIDUAL)
        tl.store(LSE + rows * heads + h, lse, mask=m_ok)


@triton.jit
def _cross_attention_combine_kernel(
    O, OUT, LSE, O_PART, LSE_PART, RESIDUAL, ALPHA,
    rows_q, heads, head_dim, num_splits, alpha_stride,
    HAS_ALPHA: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = rows < rows_q
    mask = m_ok[:, None] & (offs_d < head_dim)[None, :]
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(LSE_PART + (s * rows_q + rows) * heads + h, mask=m_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(0, num_splits):
        part = s * rows_q + rows
        w = tl.exp(tl.load(LSE_PART + part * heads + h, mask=m_ok, other=float("-inf")) - m_safe)
        o_s = tl.load(O_PART + (part[:, None] * heads + h) * head_dim + offs_d[None, :], mask=mask, other=0.0)
        total += w
        acc += w[:, None] * o_s
    seen = total > 0.0
    o = acc / tl.where(seen, total, 1.0)[:, None]
    at = (rows[:, None] * heads + h) * head_dim + offs_d[None, :]
    _write_output(O, OUT, RESIDUAL, ALPHA, o, at, h + rows * 0, mask, alpha_stride, HAS_ALPHA, HAS_RESIDUAL)
    lse = tl.where(seen, m_safe + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(LSE + rows * heads + h, lse, mask=m_ok)


@triton.jit
def _cross_attention_bwd_preprocess_kernel(
    O, DOUT, ALPHA, DELTA, R,
    rows_q, heads, head_dim, alpha_stride,
    HAS_ALPHA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = rows < rows_q
    mask = m_ok[:, None] & (offs_d < head_dim)[None, :]
    at = (rows[:, None] * heads + h) * head_dim + offs_d[None, :]
    o = tl.load(O + at, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOUT + at, mask=mask, other=0.0).to(tl.float32)
    r = tl.sum(o * do, 1)
    delta = r
    if HAS_ALPHA:
        tl.store(R + rows * heads + h, r, mask=m_ok)
        delta = r * tl.load(ALPHA + h * alpha_stride)
    tl.store(DELTA + rows * heads + h, delta, mask=m_ok)


@triton.jit
def _cross_attention_bwd_dkdv_block(
    pid_n, Q, K, V, DOUT, LSE, DELTA, ALPHA, DK, DV, CU_Q, CU_K, SEED,
    KEY_GROUP, Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    heads, kv_heads, seqlen_q, seqlen_k, head_dim, group, scale, alpha_stride, drop_threshold, keep_scale,
    tokens_q, tokens_k,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALPHA: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D0: tl.constexpr, HEAD_D1: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    # Row strides are multiples of ROW_ALIGN (the launcher checked): whole-vector rows.
    stride_qt, stride_qh = _aligned2(stride_qt, stride_qh, ROW_ALIGN)
    stride_kt, stride_kh = _aligned2(stride_kt, stride_kh, ROW_ALIGN)
    stride_vt, stride_vh = _aligned2(stride_vt, stride_vh, ROW_ALIGN)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    q_start, len_q = _segment_rows(CU_Q, b, seqlen_q, tokens_q, VARLEN)
    k_start, len_k = _segment_rows(CU_K, b, seqlen_k, tokens_k, VARLEN)
    n_first = pid_n * BLOCK_N
    if n_first >= len_k:
        return
    offs_n = n_first + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D0)  # head-dim pieces (_head_dim.py): offs_d, then the tail offs_t
    n_ok = offs_n < len_k
    rows_k = (k_start + offs_n).to(tl.int64)
    K_rows = K + hk * stride_kh + rows_k[:, None] * stride_kt
    V_rows = V + hk * stride_vh + rows_k[:, None] * stride_vt
    k = _load_cols(K_rows, n_ok, offs_d, head_dim)
    v = _load_cols(V_rows, n_ok, offs_d, head_dim)
    dk = tl.zeros((BLOCK_N, HEAD_D0), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_D0), dtype=tl.float32)
    if HEAD_D1 > 0:
        offs_t = HEAD_D0 + tl.arange(0, HEAD_D1)
        k1 = _load_cols(K_rows, n_ok, offs_t, head_dim)
        v1 = _load_cols(V_rows, n_ok, offs_t, head_dim)
        dk1 = tl.zeros((BLOCK_N, HEAD_D1), dtype=tl.float32)
        dv1 = tl.zeros((BLOCK_N, HEAD_D1), dtype=tl.float32)
    scale_log2 = scale * _LOG2E
    n_end = tl.minimum(n_first + BLOCK_N, len_k)

    # The query heads of this K/V head's group, in order: the sum is deterministic.
    for g in range(0, group):
        h = hk * group + g
        a = 1.0
        if HAS_ALPHA:
            a = tl.load(ALPHA + h * alpha_stride)
        for start_m in range(0, len_q, BLOCK_M):
            m_ok = start_m + offs_m < len_q
            rows = (q_start + start_m + offs_m).to(tl.int64)
            first, last, lo, hi = _query_mask(Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI, rows, m_ok, HAS_MASK)
            if (lo < n_end) & (hi > n_first):  # some query of the block may see these keys
                Q_rows = Q + h * stride_qh + rows[:, None] * stride_qt
                DO_rows = DOUT + (rows[:, None] * heads + h) * head_dim
                q = _load_cols(Q_rows, m_ok, offs_d, head_dim)
                do = _load_cols(DO_rows, m_ok, offs_d, head_dim)
                lse = tl.load(LSE + rows * heads + h, mask=m_ok, other=0.0)
                delta = tl.load(DELTA + rows * heads + h, mask=m_ok, other=0.0)
                # lse = -inf marks a query that sees nothing: +inf makes its p exactly 0.
                lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
                # Transposed tiles ([keys, queries]): p^T and ds^T feed the dk, dv dots
                # directly, with no register transpose.
                s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                if HEAD_D1 > 0:  # k.q and v.dOut reduce over the head dim: add the tail's dots
                    q1 = _load_cols(Q_rows, m_ok, offs_t, head_dim)
                    do1 = _load_cols(DO_rows, m_ok, offs_t, head_dim)
                    s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=PRECISION)
                    dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=PRECISION)
                ok_t = _sees_t(first, last, KEY_GROUP, rows_k, m_ok, n_ok, HAS_MASK)
                p_t = tl.where(ok_t, tl.exp2(s_t * scale_log2 - lse2[None, :]), 0.0)
                dp_t = a * dp_t
                p_kept = p_t
                if DROPOUT:  # dv through the dropped probabilities; dp back through the mask
                    keep = tl.trans(dropout_keep(SEED, rows, h + offs_m * 0, n_first // 4 + tl.arange(0, BLOCK_N // 4),
                                                 drop_threshold, BLOCK_M, BLOCK_N))
                    p_kept = tl.where(keep, p_t * keep_scale, 0.0)
                    dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
                p_kept = p_kept.to(do.dtype)
                dv += a * tl.dot(p_kept, do, input_precision=PRECISION)
                ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
                dk += tl.dot(ds_t, q, input_precision=PRECISION)
                if HEAD_D1 > 0:  # p^T dOut and ds^T q produce head-dim columns: one accumulator per piece
                    dv1 += a * tl.dot(p_kept, do1, input_precision=PRECISION)
                    dk1 += tl.dot(ds_t, q1, input_precision=PRECISION)

    at = (rows_k[:, None] * kv_heads + hk) * head_dim
    _store_cols(DK + at, (dk * scale).to(DK.dtype.element_ty), n_ok, offs_d, head_dim)
    _store_cols(DV + at, dv.to(DV.dtype.element_ty), n_ok, offs_d, head_dim)
    if HEAD_D1 > 0:
        _store_cols(DK + at, (dk1 * scale).to(DK.dtype.element_ty), n_ok, offs_t, head_dim)
        _store_cols(DV + at, dv1.to(DV.dtype.element_ty), n_ok, offs_t, head_dim)


@triton.jit
def _cross_attention_bwd_dq_block(
    pid_m, Q, K, V, DOUT, LSE, DELTA, ALPHA, DQ, DQ_PART, CU_Q, CU_K, SEED,
    KEY_GROUP, Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    rows_q, heads, seqlen_q, seqlen_k, head_dim, group, scale, split_size, num_splits,
    alpha_stride, drop_threshold, keep_scale, tokens_k,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALPHA: tl.constexpr, SPLIT: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D0: tl.constexpr, HEAD_D1: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    # Row strides are multiples of ROW_ALIGN (the launcher checked): whole-vector rows.
    stride_qt, stride_qh = _aligned2(stride_qt, stride_qh, ROW_ALIGN)
    stride_kt, stride_kh = _aligned2(stride_kt, stride_kh, ROW_ALIGN)
    stride_vt, stride_vh = _aligned2(stride_vt, stride_vh, ROW_ALIGN)
    b = tl.program_id(1)
    hk = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    q_start, len_q = _segment_rows(CU_Q, b, seqlen_q, rows_q, VARLEN)
    k_start, len_k = _segment_rows(CU_K, b, seqlen_k, tokens_k, VARLEN)
    m_first = pid_m * BLOCK_M
    if m_first >= len_q * group:
        return
    # (query, head) rows of K/V head hk's group, query-major, as in the forward.
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D0)  # head-dim pieces (_head_dim.py): offs_d, then the tail offs_t
    m_ok = offs_m < len_q * group
    rows = (q_start + offs_m // group).to(tl.int64)
    h = hk * group + offs_m % group
    at = (rows[:, None] * heads + h[:, None]) * head_dim
    Q_rows = Q + h[:, None] * stride_qh + rows[:, None] * stride_qt
    q = _load_cols(Q_rows, m_ok, offs_d, head_dim)
    do = _load_cols(DOUT + at, m_ok, offs_d, head_dim)
    dq = tl.zeros((BLOCK_M, HEAD_D0), dtype=tl.float32)
    if HEAD_D1 > 0:
        offs_t = HEAD_D0 + tl.arange(0, HEAD_D1)
        q1 = _load_cols(Q_rows, m_ok, offs_t, head_dim)
        do1 = _load_cols(DOUT + at, m_ok, offs_t, head_dim)
        dq1 = tl.zeros((BLOCK_M, HEAD_D1), dtype=tl.float32)
    lse = tl.load(LSE + rows * heads + h, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + rows * heads + h, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    a = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    if HAS_ALPHA:
        a = tl.load(ALPHA + h * alpha_stride)
    scale_log2 = scale * _LOG2E
    first, last, lo, hi = _query_mask(Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI, rows, m_ok, HAS_MASK)
    lo = tl.maximum(lo, split * split_size)
    hi = tl.minimum(tl.minimum(hi, _split_end(split, split_size, num_splits, len_k)), len_k)
    if DROPOUT:  # the forward's tiling of the keys into Philox quads
        lo = (lo // 4) * 4
    K_head = K + hk * stride_kh
    V_head = V + hk * stride_vh

    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < hi
        rows_k = (k_start + cols).to(tl.int64)
        K_rows = K_head + rows_k[:, None] * stride_kt
        V_rows = V_head + rows_k[:, None] * stride_vt
        k = _load_cols(K_rows, n_ok, offs_d, head_dim)
        v = _load_cols(V_rows, n_ok, offs_d, head_dim)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if HEAD_D1 > 0:  # q.k and dOut.v reduce over the head dim: add the tail's dots
            k1 = _load_cols(K_rows, n_ok, offs_t, head_dim)
            v1 = _load_cols(V_rows, n_ok, offs_t, head_dim)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=PRECISION)
        ok = _sees(first, last, KEY_GROUP, rows_k, m_ok, n_ok, HAS_MASK)
        p = tl.where(ok, tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
        dp = a[:, None] * dp
        if DROPOUT:
            keep = dropout_keep(SEED, rows, h, start_n // 4 + tl.arange(0, BLOCK_N // 4), drop_threshold,
                                BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq += tl.dot(ds, k, input_precision=PRECISION)
        if HEAD_D1 > 0:  # ds k produces head-dim columns: one accumulator per piece
            dq1 += tl.dot(ds, k1, input_precision=PRECISION)

    if SPLIT:
        part = split.to(tl.int64) * rows_q + rows
        PART_rows = DQ_PART + (part[:, None] * heads + h[:, None]) * head_dim
        _store_cols(PART_rows, dq * scale, m_ok, offs_d, head_dim)
        if HEAD_D1 > 0:
            _store_cols(PART_rows, dq1 * scale, m_ok, offs_t, head_dim)
    else:
        _store_cols(DQ + at, (dq * scale).to(DQ.dtype.element_ty), m_ok, offs_d, head_dim)
        if HEAD_D1 > 0:
            _store_cols(DQ + at, (dq1 * scale).to(DQ.dtype.element_ty), m_ok, offs_t, head_dim)


# ---- main and overflow passes ----------------------------------------------------
# max_seqlen only sizes the grid of the main pass (LOOP=False: one block per program, the
# kernels as they always were). For packed inputs an overflow pass follows (LOOP=True: a
# program per segment, head (and key split) runs blocks first_block, first_block + grid,
# ... of its segment), so a segment longer than max_seqlen (a caller's mistake that cannot
# be seen without a device-to-host sync) is still covered, only more slowly.


@triton.jit
def _cross_attention_fwd_kernel(
    Q, K, V, O, OUT, LSE, O_PART, LSE_PART, RESIDUAL, ALPHA, CU_Q, CU_K, SEED,
    KEY_GROUP, Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    rows_q, heads, seqlen_q, seqlen_k, head_dim, group, scale_log2, split_size, num_splits,
    alpha_stride, drop_threshold, keep_scale, tokens_k,
    first_block,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr,
    HAS_ALPHA: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D0: tl.constexpr,
    HEAD_D1: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    if LOOP:  # the overflow pass: blocks from first_block on, a stride of the grid apart
        _, len_q = _segment_rows(CU_Q, tl.program_id(1), seqlen_q, rows_q, VARLEN)
        for pid_m in range(first_block + tl.program_id(0), tl.cdiv(len_q * group, BLOCK_M), tl.num_programs(0)):
            _cross_attention_fwd_block(
                pid_m, Q, K, V, O, OUT, LSE, O_PART, LSE_PART, RESIDUAL, ALPHA, CU_Q, CU_K, SEED,
                KEY_GROUP, Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                rows_q, heads, seqlen_q, seqlen_k, head_dim, group, scale_log2, split_size, num_splits,
                alpha_stride, drop_threshold, keep_scale, tokens_k,
                VARLEN, HAS_MASK, SPLIT, HAS_ALPHA, HAS_RESIDUAL, DROPOUT, PRECISION, BLOCK_M, BLOCK_N,
                HEAD_D0, HEAD_D1, ROW_ALIGN,
            )
    else:  # the main pass: one block per program, the grid sized by max_seqlen
        _cross_attention_fwd_block(
            tl.program_id(0), Q, K, V, O, OUT, LSE, O_PART, LSE_PART, RESIDUAL, ALPHA, CU_Q, CU_K, SEED,
            KEY_GROUP, Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
            rows_q, heads, seqlen_q, seqlen_k, head_dim, group, scale_log2, split_size, num_splits,
            alpha_stride, drop_threshold, keep_scale, tokens_k,
            VARLEN, HAS_MASK, SPLIT, HAS_ALPHA, HAS_RESIDUAL, DROPOUT, PRECISION, BLOCK_M, BLOCK_N,
            HEAD_D0, HEAD_D1, ROW_ALIGN,
        )


@triton.jit
def _cross_attention_bwd_dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, ALPHA, DK, DV, CU_Q, CU_K, SEED,
    KEY_GROUP, Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    heads, kv_heads, seqlen_q, seqlen_k, head_dim, group, scale, alpha_stride, drop_threshold, keep_scale,
    tokens_q, tokens_k,
    first_block,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALPHA: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D0: tl.constexpr,
    HEAD_D1: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    if LOOP:  # the overflow pass: blocks from first_block on, a stride of the grid apart
        _, len_k = _segment_rows(CU_K, tl.program_id(1), seqlen_k, tokens_k, VARLEN)
        for pid_n in range(first_block + tl.program_id(0), tl.cdiv(len_k, BLOCK_N), tl.num_programs(0)):
            _cross_attention_bwd_dkdv_block(
                pid_n, Q, K, V, DOUT, LSE, DELTA, ALPHA, DK, DV, CU_Q, CU_K, SEED,
                KEY_GROUP, Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                heads, kv_heads, seqlen_q, seqlen_k, head_dim, group, scale, alpha_stride, drop_threshold, keep_scale,
                tokens_q, tokens_k,
                VARLEN, HAS_MASK, HAS_ALPHA, DROPOUT, PRECISION, BLOCK_M, BLOCK_N,
                HEAD_D0, HEAD_D1, ROW_ALIGN,
            )
    else:  # the main pass: one block per program, the grid sized by max_seqlen
        _cross_attention_bwd_dkdv_block(
            tl.program_id(0), Q, K, V, DOUT, LSE, DELTA, ALPHA, DK, DV, CU_Q, CU_K, SEED,
            KEY_GROUP, Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
            heads, kv_heads, seqlen_q, seqlen_k, head_dim, group, scale, alpha_stride, drop_threshold, keep_scale,
            tokens_q, tokens_k,
            VARLEN, HAS_MASK, HAS_ALPHA, DROPOUT, PRECISION, BLOCK_M, BLOCK_N,
            HEAD_D0, HEAD_D1, ROW_ALIGN,
        )


@triton.jit
def _cross_attention_bwd_dq_kernel(
    Q, K, V, DOUT, LSE, DELTA, ALPHA, DQ, DQ_PART, CU_Q, CU_K, SEED,
    KEY_GROUP, Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    rows_q, heads, seqlen_q, seqlen_k, head_dim, group, scale, split_size, num_splits,
    alpha_stride, drop_threshold, keep_scale, tokens_k,
    first_block,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALPHA: tl.constexpr, SPLIT: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D0: tl.constexpr,
    HEAD_D1: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    if LOOP:  # the overflow pass: blocks from first_block on, a stride of the grid apart
        _, len_q = _segment_rows(CU_Q, tl.program_id(1), seqlen_q, rows_q, VARLEN)
        for pid_m in range(first_block + tl.program_id(0), tl.cdiv(len_q * group, BLOCK_M), tl.num_programs(0)):
            _cross_attention_bwd_dq_block(
                pid_m, Q, K, V, DOUT, LSE, DELTA, ALPHA, DQ, DQ_PART, CU_Q, CU_K, SEED,
                KEY_GROUP, Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                rows_q, heads, seqlen_q, seqlen_k, head_dim, group, scale, split_size, num_splits,
                alpha_stride, drop_threshold, keep_scale, tokens_k,
                VARLEN, HAS_MASK, HAS_ALPHA, SPLIT, DROPOUT, PRECISION, BLOCK_M, BLOCK_N,
                HEAD_D0, HEAD_D1, ROW_ALIGN,
            )
    else:  # the main pass: one block per program, the grid sized by max_seqlen
        _cross_attention_bwd_dq_block(
            tl.program_id(0), Q, K, V, DOUT, LSE, DELTA, ALPHA, DQ, DQ_PART, CU_Q, CU_K, SEED,
            KEY_GROUP, Q_FIRST, Q_LAST, Q_KEY_LO, Q_KEY_HI,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
            rows_q, heads, seqlen_q, seqlen_k, head_dim, group, scale, split_size, num_splits,
            alpha_stride, drop_threshold, keep_scale, tokens_k,
            VARLEN, HAS_MASK, HAS_ALPHA, SPLIT, DROPOUT, PRECISION, BLOCK_M, BLOCK_N,
            HEAD_D0, HEAD_D1, ROW_ALIGN,
        )


# ---- launchers -------------------------------------------------------------------

# Keys one split should hold at least: fewer and the combine costs more than it saves.
_MIN_SPLIT_KEYS_GPU = 256
_INTERPRETER_SMS = 32


def _blocks(device: torch.device, head_dim: int, max_rows: int, backward: bool, dkdv: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for blocks of ``max_rows`` query rows at
    most (queries x query heads per K/V head in the forward); ``dkdv``: the backward's
    dK/dV kernel, else its dQ kernel. Few forward rows get a tile no larger than they
    need. Backward tiles compile with no spill on sm_90a and lower every dot to wgmma
    (>= 64 rows: BLOCK_N in dkdv, whose dots give [keys, .] tiles, BLOCK_M in dq); see
    scripts/sm90_attention_resources.py. Untimed on GPUs: to be measured. The
    interpreter gets small tiles (it runs them in numpy)."""
    if device.type != "cuda":
        return 16, 16, 1, 1
    width = sum(head_dim_pieces(head_dim))
    if backward:
        if width <= 64:  # dq: 8 warps (4 spilled at head dim 40, packed)
            return (64, 64, 4, 2) if dkdv else (64, 64, 8, 2)
        if dkdv:  # fewer query rows per step as dK, dV grow
            return (64 if width <= 96 else 32 if width <= 128 else 16), 64, 8, 2
        return (64, 64, 8, 2) if width <= 128 else (64, 32, 8, 1)
    block_m = 128 if width <= 128 else 64
    block_m = min(block_m, max(16, triton.next_power_of_2(max_rows)))
    if width <= 64:
        return block_m, 64, 4, 3
    return (block_m, 64 if block_m <= 64 else 32, 4 if block_m <= 64 else 8, 2)


def _overflow_blocks(device: torch.device) -> tuple[int, int, int, int]:
    """Tiles of the overflow pass: small (correctness, not speed), dividing every main tile.
    16 x 16: 32 keys spilled in dK/dV at head dim 160 on sm_90a (scripts/sm90_attention_resources.py)."""
    return (16, 16, 4, 1) if device.type == "cuda" else (16, 16, 1, 1)


def _passes(grid0: int, main: tuple, by_keys: bool, varlen: bool, device: torch.device) -> list:
    """(grid dim 0, first block, LOOP, tiles) of each launch over one axis: the main pass
    (one block per program, the grid sized by max_seqlen), then for packed inputs the
    overflow pass (a program per segment and head looping over the blocks past the main
    grid: nothing to do when max_seqlen bounds the segments), in small tiles that divide
    every main one (correctness, not speed). ``by_keys``: blocks of keys (BLOCK_N)."""
    over = _overflow_blocks(device)
    passes = [(grid0, 0, False, main)]
    if varlen:
        main_block, over_block = (main[1], over[1]) if by_keys else (main[0], over[0])
        passes.append((1, grid0 * main_block // over_block, True, over))
    return passes


def num_splits(device: torch.device, programs: int, max_seqlen_k: int, block_n: int) -> int:
    """Key splits per (query block, head, segment): enough programs for about two waves,
    with at least a few key tiles per split."""
    # The interpreter pretends to a mid-sized GPU, so that small test shapes split too.
    sms = multiprocessor_count(device) if device.type == "cuda" else _INTERPRETER_SMS
    if programs >= sms:
        return 1
    min_keys = _MIN_SPLIT_KEYS_GPU if device.type == "cuda" else block_n
    by_keys = max(1, max_seqlen_k // min_keys)
    return max(1, min(triton.cdiv(2 * sms, max(programs, 1)), by_keys, 128))


def _precision(dtype: torch.dtype) -> str:
    # IEEE float32 dots for float32 inputs: TF32 would be less accurate than the reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(mask, like: torch.Tensor):
    """The five mask arrays (read as flat arrays: made contiguous), or stand-ins (never
    read) when there is no mask."""
    return tuple(dense(t) for t in mask) if mask is not None else (like,) * 5


def cross_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, batch: int, seqlen_q: int, seqlen_k: int,
                        max_seqlen_q: int, max_seqlen_k: int, mask, alpha, residual, scale: float,
                        seed=None, dropout_p: float = 0.0):
    """Launch the forward (and, with key splits, the combine). Returns (out, o, lse).

    q [rows_q, Hq, D], k, v [rows_k, Hk, D] (last dim contiguous). Packed: cu_seqlens_*
    int32 [B+1], max_seqlen_* bound the segments (they size the grid; nothing is read back).
    Padded: cu_seqlens_* None, segment b is rows b * seqlen .. (b + 1) * seqlen.
    ``mask``: None or the five int32 arrays (key_group, query_first, query_last,
    query_key_lo, query_key_hi). ``alpha``: None or float32 [1] or [Hq]; ``residual``: None
    or contiguous like q. out = residual + alpha * o (out is o without either); o
    contiguous like q; lse float32 [rows_q, Hq]. ``seed`` (int64 [2] on the device) and
    ``dropout_p`` > 0: attention dropout (kernels/attention_dropout.py) on o; lse unaffected.
    A segment longer than max_seqlen_* is still computed (the kernels loop; the last key
    split takes the rest); cu_seqlens values are clamped into [0, rows] on the device.
    """
    varlen = cu_seqlens_q is not None
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    cu_seqlens_q, cu_seqlens_k = dense(cu_seqlens_q), dense(cu_seqlens_k)
    residual, alpha = dense(residual), dense(alpha)
    if varlen:  # at least one block per segment, whatever max_seqlen says
        max_seqlen_q, max_seqlen_k = max(max_seqlen_q, 1), max(max_seqlen_k, 1)
    rows_q, heads, head_dim = q.shape
    o = empty(q.shape, dtype=q.dtype, device=q.device)
    epilogue = alpha is not None or residual is not None
    out = empty(q.shape, dtype=q.dtype, device=q.device) if epilogue else o
    lse = empty((rows_q, heads), dtype=torch.float32, device=q.device)
    if batch == 0 or max_seqlen_q == 0 or rows_q == 0 or heads == 0:  # (padded: no queries)
        return out, o, lse
    kv_heads = k.shape[1]
    group = heads // kv_heads
    BLOCK_M, BLOCK_N, num_warps, num_stages = _blocks(q.device, head_dim, max_seqlen_q * group, backward=False)
    m_blocks = triton.cdiv(max_seqlen_q * group, BLOCK_M)
    splits = num_splits(q.device, m_blocks * batch * kv_heads, max_seqlen_k, BLOCK_N)
    split_size = triton.cdiv(triton.cdiv(max(max_seqlen_k, 1), splits), BLOCK_N) * BLOCK_N
    o_part = lse_part = lse
    if splits > 1:
        o_part = torch.empty((splits, rows_q, heads, head_dim), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, rows_q, heads), dtype=torch.float32, device=q.device)
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    res = residual if residual is not None else q
    alpha_t = alpha if alpha is not None else lse
    alpha_stride = 1 if alpha is not None and alpha.numel() > 1 else 0
    BLOCK_D = triton.next_power_of_2(head_dim)
    main = (BLOCK_M, BLOCK_N, num_warps, num_stages)
    for grid0, first, loop, (BLOCK_M, BLOCK_N, num_warps, num_stages) in _passes(m_blocks, main, False, varlen,
                                                                                q.device):
        _cross_attention_fwd_kernel[(grid0, batch, kv_heads * splits)](
            q, k, v, o, out, lse, o_part, lse_part, res, alpha_t, cu_q, cu_k, seed if seed is not None else cu_q,
            *_mask_args(mask, cu_q),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            rows_q, heads, seqlen_q, seqlen_k, head_dim, group, scale * LOG2E,
            split_size, splits, alpha_stride, *_dropout_args(dropout_p), k.shape[0], first,
            VARLEN=varlen, HAS_MASK=mask is not None, SPLIT=splits > 1,
            HAS_ALPHA=alpha is not None, HAS_RESIDUAL=residual is not None, DROPOUT=dropout_p > 0,
            PRECISION=_precision(q.dtype), LOOP=loop, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            **_pieces(head_dim, q, k, v), num_warps=num_warps, num_stages=num_stages,
        )
    if splits > 1:
        COMBINE_M = 16
        _cross_attention_combine_kernel[(triton.cdiv(rows_q, COMBINE_M), heads)](
            o, out, lse, o_part, lse_part, res, alpha_t,
            rows_q, heads, head_dim, splits, alpha_stride,
            HAS_ALPHA=alpha is not None, HAS_RESIDUAL=residual is not None,
            BLOCK_M=COMBINE_M, BLOCK_D=BLOCK_D,
        )
    return out, o, lse


def cross_attention_bwd(dout, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, batch: int,
                        seqlen_q: int, seqlen_k: int, max_seqlen_q: int, max_seqlen_k: int,
                        mask, alpha, scale: float, seed=None, dropout_p: float = 0.0):
    """Launch the backward. Returns (dq, dk, dv, r): dq like q, dk/dv like k/v (contiguous
    [rows, H, D]); r = rowsum(dout * o) float32 [rows_q, Hq] when ``alpha`` is given (the
    gate's gradient is its sum over the gate's heads), else None. ``dout`` is contiguous.
    ``seed``, ``dropout_p``: those of the forward, whose mask the kernels regenerate.
    max_seqlen and cu_seqlens as in :func:`cross_attention_fwd`."""
    varlen = cu_seqlens_q is not None
    dout, q, k, v, o = (unit_last(t) for t in (dout, q, k, v, o))
    dout, o, lse, alpha = dense(dout), dense(o), dense(lse), dense(alpha)
    cu_seqlens_q, cu_seqlens_k = dense(cu_seqlens_q), dense(cu_seqlens_k)
    if varlen:  # at least one block per segment, whatever max_seqlen says
        max_seqlen_q, max_seqlen_k = max(max_seqlen_q, 1), max(max_seqlen_k, 1)
    rows_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=k.device)
    dv = empty(v.shape, dtype=v.dtype, device=v.device)
    r = torch.zeros((rows_q, heads), dtype=torch.float32, device=q.device) if alpha is not None else None
    if batch == 0 or heads == 0 or rows_q == 0 or k.shape[0] == 0:
        # Nothing attends: every gradient is zero (and must be written).
        return dq.zero_(), dk.zero_(), dv.zero_(), r
    BLOCK_M, BLOCK_N, num_warps, num_stages = _blocks(q.device, head_dim, max_seqlen_q, backward=True)
    KV_M, KV_N, kv_warps, kv_stages = _blocks(q.device, head_dim, max_seqlen_q, backward=True, dkdv=True)
    BLOCK_D = triton.next_power_of_2(head_dim)
    delta = torch.empty((rows_q, heads), dtype=torch.float32, device=q.device)
    alpha_t = alpha if alpha is not None else delta
    alpha_stride = 1 if alpha is not None and alpha.numel() > 1 else 0
    _cross_attention_bwd_preprocess_kernel[(triton.cdiv(rows_q, BLOCK_M), heads)](
        o, dout, alpha_t, delta, r if r is not None else delta,
        rows_q, heads, head_dim, alpha_stride,
        HAS_ALPHA=alpha is not None, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
    )
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    seed = seed if seed is not None else cu_q
    common = dict(VARLEN=varlen, HAS_MASK=mask is not None, HAS_ALPHA=alpha is not None,
                  DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype), **_pieces(head_dim, q, k, v))
    if max_seqlen_k > 0:
        main = (KV_M, KV_N, kv_warps, kv_stages)
        for grid0, first, loop, (bm, bn, warps, stages) in _passes(triton.cdiv(max_seqlen_k, KV_N), main, True,
                                                                   varlen, q.device):
            _cross_attention_bwd_dkdv_kernel[(grid0, batch, kv_heads)](
                q, k, v, dout, lse, delta, alpha_t, dk, dv, cu_q, cu_k, seed, *_mask_args(mask, cu_q), *strides,
                heads, kv_heads, seqlen_q, seqlen_k, head_dim, heads // kv_heads, scale, alpha_stride,
                *_dropout_args(dropout_p), rows_q, k.shape[0], first, **common,
                LOOP=loop, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
            )
    if max_seqlen_q > 0:
        group = heads // kv_heads
        m_blocks = triton.cdiv(max_seqlen_q * group, BLOCK_M)
        splits = num_splits(q.device, m_blocks * batch * kv_heads, max_seqlen_k, BLOCK_N)
        split_size = triton.cdiv(triton.cdiv(max(max_seqlen_k, 1), splits), BLOCK_N) * BLOCK_N
        dq_part = delta
        if splits > 1:
            dq_part = torch.empty((splits, rows_q, heads, head_dim), dtype=torch.float32, device=q.device)
        main = (BLOCK_M, BLOCK_N, num_warps, num_stages)
        for grid0, first, loop, (bm, bn, warps, stages) in _passes(m_blocks, main, False, varlen, q.device):
            _cross_attention_bwd_dq_kernel[(grid0, batch, kv_heads * splits)](
                q, k, v, dout, lse, delta, alpha_t, dq, dq_part, cu_q, cu_k, seed, *_mask_args(mask, cu_q),
                *strides, rows_q, heads, seqlen_q, seqlen_k, head_dim, heads // kv_heads, scale, split_size,
                splits, alpha_stride, *_dropout_args(dropout_p), k.shape[0], first, SPLIT=splits > 1, **common,
                LOOP=loop, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
            )
        if splits > 1:
            torch.sum(dq_part, dim=0, out=dq) if dq.dtype == torch.float32 else dq.copy_(dq_part.sum(0))
    return dq, dk, dv, r
