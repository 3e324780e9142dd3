"""Triton attention for many short packed segments (each of at most MAX_SEQLEN = 128
tokens, such as the 64-token windows of the Qwen2.5-VL vision encoder).

The general kernel (attention.py) gives every segment its own query tiles and streams
its keys through an online softmax. A segment shorter than a tile leaves most of the
tile idle, and the online-softmax bookkeeping buys nothing when every key fits at once.
Here a program takes whole segments: segment b is given a slot of SLOT_Q query rows and
SLOT_K key columns (powers of two >= the longest segment), and SEGS consecutive slots
share one tile, so tiny segments still fill a tile big enough for the tensor cores:

    tile rows    = SEGS x ROWS    (ROWS = SLOT_Q / SPLIT: a long slot spans SPLIT programs)
    tile columns = SEGS x SLOT_K  (all the keys of the tile's segments, in one block)

The score tile is block-diagonal: row r (segment r // ROWS) sees column c (segment
c // SLOT_K) only within its own segment and window. Rows and columns are gathered
through cu_seqlens, so segments need not be padded in memory and lq may differ from lk.
With every key of a row in one block the softmax is exact in one pass (no running max).

The head dim is tiled in at most two power-of-two pieces as in attention.py (80 = 64 +
16). The backward works on transposed [keys, queries] score tiles, so p^T and ds^T feed
the dv and dk dots directly (dq takes the one register transpose left).

Semantics are those of attention.py: packed layout Q [Tq, Hq, D], K/V [Tk, Hk, D],
cu_seqlens int32 [B+1]; bottom-right aligned windows (causal is window_right = 0); a
query that sees no key gets out = 0 and lse = -inf; lse [Hq, Tq] in float32.

Backward (segments of at most BWD_MAX_KEYS keys; longer ones take attention.py's
backward): one program per (group of SEGS segments, K/V head) owns every query and key of
its segments, so it computes dq, dk and dv completely, with no atomics and no second
pass (deterministic). It holds dk and dv for the tile's keys in registers while looping
over the query heads of the GQA group and the SPLIT query chunks. Every key of a row is
in the tile, so the softmax is recomputed exactly as eager attention does (no lse, whose
rounding would leave p unnormalised), and delta (rowsum(dO * O) in flash-attention) is
summed from p and dp, without O's rounding and the cancellation between two dot products;
dLSE is added after centring (folded into delta it would lose bits against a large dp):
    p = softmax(scale q.k),  dp = dO.v,  ds = p ((dp - rowsum(p dp)) + dLSE)
    dv += p^T dO,  dk += scale ds^T q,  dq = scale ds k   (dq written once, per chunk)

Dropout (DROPOUT=True) as in attention.py: the tile's mask is regenerated from the seed
(rows by token, columns by key position within the segment: the general kernel's mask),
and delta = rowsum(p dp) is taken with the dropped dp. Key slots are at least 4 wide.

Rotary (ROTARY=True) as in attention.py, with its helpers: the forward rotates q and k
tiles as it loads them (a second, permuted-column load); the backward reads rotated
copies written by _attention_short_rotate_kernel (rotating inside it spilled registers on
sm_90a) and rotates dq and dk back (a register gather) before the store. Token t of the packed layout (q's and k's alike)
reads table row offset t * stride_ct + seg * stride_cs: packed tables are indexed by token
(stride_cs = 0); a padded batch, flattened into one segment of T tokens per entry, moves
each segment onto its own table ([B, T, R/2]) or back onto the shared one ([T, R/2]).
"""

import torch
import triton
import triton.language as tl

from ._launch import dense, empty, unit_last
from .attention import (_aligned2, _dropout_args, _load_cols, _load_rotated, _normalise, _pieces, _rotate_back,
                        _store_cols, attention_bwd, attention_fwd)
from .attention_dropout import dropout_keep

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)

# The longest segment this path takes: past it the general kernel's tiles are full anyway.
MAX_SEQLEN = 128
MAX_HEAD_DIM = 128
# The backward kernel holds dK and dV of a tile's keys in registers. At 128 keys it spilled
# on sm_90a in every specialisation tried from head dim 80 up (16 B at 128; 264 B at 128
# with dropout; 144-464 B at 80-96 with dropout, rotary or both), and 32-row query chunks
# did not cure it. Segments with more keys than this take the general kernels' backward,
# whose 64 x 64 tiles hold such a segment in two blocks (the forward stays here).
BWD_MAX_KEYS = 64


@triton.jit
def _bounds(CU, seg, exists, tokens):
    """(first token, length) of segments ``seg``, cu_seqlens clamped into [0, tokens] (a
    segment ending before it starts is empty): no value reaches outside the tensors."""
    start = tl.minimum(tl.maximum(tl.load(CU + seg, mask=exists, other=0), 0), tokens)
    end = tl.minimum(tl.maximum(tl.load(CU + seg + 1, mask=exists, other=0), start), tokens)
    return start, end - start


@triton.jit
def _slot_lengths(CU_Q, CU_K, seg, batch, tokens_q, tokens_k, CAP_Q: tl.constexpr, SLOT_K: tl.constexpr):
    """Query and key starts and lengths of segments ``seg``; a segment too long for its
    slot (max_seqlen was too small) gets length 0 here: the general kernel runs it."""
    exists = seg < batch
    q_start, len_q = _bounds(CU_Q, seg, exists, tokens_q)
    k_start, len_k = _bounds(CU_K, seg, exists, tokens_k)
    fits = (len_q <= CAP_Q) & (len_k <= SLOT_K)
    return q_start, tl.where(fits, len_q, 0), k_start, tl.where(fits, len_k, 0)


@triton.jit
def _rows(CU_Q, CU_K, first_seg, chunk, batch, tokens_q, tokens_k, ROWS: tl.constexpr, SEGS: tl.constexpr,
          SPLIT: tl.constexpr, SLOT_K: tl.constexpr):
    """Per tile row: segment, position in it, first query token, query and key lengths."""
    r = tl.arange(0, SEGS * ROWS)
    seg = first_seg + r // ROWS
    pos = chunk * ROWS + r % ROWS
    start, len_q, _, len_k = _slot_lengths(CU_Q, CU_K, seg, batch, tokens_q, tokens_k, ROWS * SPLIT, SLOT_K)
    return seg, pos, start, len_q, len_k


@triton.jit
def _columns(CU_Q, CU_K, first_seg, batch, tokens_q, tokens_k, SLOT_K: tl.constexpr, SEGS: tl.constexpr,
             CAP_Q: tl.constexpr):
    """Per tile column: segment, key position in it, first key token, key length."""
    c = tl.arange(0, SEGS * SLOT_K)
    seg = first_seg + c // SLOT_K
    pos = c % SLOT_K
    _, _, start, length = _slot_lengths(CU_Q, CU_K, seg, batch, tokens_q, tokens_k, CAP_Q, SLOT_K)
    return seg, pos, start, length


@triton.jit
def _block_diagonal(seg_r, pos_r, len_q, len_k_r, seg_c, pos_c, len_k_c, window_left, window_right,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[M, N] mask: row r sees column c (same segment, both real, inside the window)."""
    return _sees(seg_r[:, None], pos_r[:, None], len_q[:, None], len_k_r[:, None],
                 seg_c[None, :], pos_c[None, :], len_k_c[None, :], window_left, window_right, HAS_LEFT, HAS_RIGHT)


@triton.jit
def _sees(seg_r, pos_r, len_q, len_k_r, seg_c, pos_c, len_k_c, window_left, window_right,
          HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query (seg_r, pos_r) sees key (seg_c, pos_c), broadcast: [M, 1] rows and [1, N]
    columns give the [M, N] mask, [1, M] and [N, 1] its transpose."""
    ok = (seg_r == seg_c) & (pos_r < len_q) & (pos_c < len_k_c)
    diag = pos_r + len_k_r - len_q  # the key position each query is aligned with
    if HAS_LEFT:
        ok &= pos_c >= diag - window_left
    if HAS_RIGHT:
        ok &= pos_c <= diag + window_right
    return ok


@triton.jit
def _table_rows(rows, seg, stride_ct, stride_cs):
    """[rows, 1] offsets into COS, SIN of tokens ``rows`` ([rows, 1] int64) of segments ``seg``."""
    return rows * stride_ct + seg.to(tl.int64)[:, None] * stride_cs


@triton.jit
def _key_quads(SEGS: tl.constexpr, SLOT_K: tl.constexpr):
    """Dropout: key position // 4 of tile columns 0, 4, 8, .. (SLOT_K >= 4: a quad of
    columns never straddles two segments)."""
    return (tl.arange(0, SEGS * SLOT_K // 4) * 4 % SLOT_K) // 4


@triton.jit
def _softmax(s):
    """Row softmax of log2-unit scores, -inf where masked; rows with no key give 0."""
    m = tl.max(s, 1)
    p = tl.exp2(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
    l = tl.sum(p, 1)
    return p / tl.where(l > 0.0, l, 1.0)[:, None]


@triton.jit
def _softmax_t(s_t):
    """_softmax of the transposed tile: over each column (a query) of log2-unit scores."""
    m = tl.max(s_t, 0)
    p = tl.exp2(s_t - tl.where(m == float("-inf"), 0.0, m)[None, :])
    l = tl.sum(p, 0)
    return p / tl.where(l > 0.0, l, 1.0)[None, :]


@triton.jit
def _attention_short_rotate_kernel(
    X, Y, CU, COS, SIN, stride_xt, stride_xh, stride_yt, stride_yh, stride_ct, stride_cs, half,
    batch, tokens, head_dim: tl.constexpr, CAP: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Y = X rotated, for the tokens of segments (cu_seqlens CU, clamped as _bounds does)
    of at most CAP tokens, the ones the attention kernel's slots take, with their table
    rows (_table_rows) and rounding: the backward's q and k. Longer segments go to the
    general kernel, which rotates its own copies."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seg = (pid // SPLIT) + tl.arange(0, ROWS) * 0
    pos = (pid % SPLIT) * ROWS + tl.arange(0, ROWS)
    start, length = _bounds(CU, seg, seg < batch, tokens)
    ok = (pos < length) & (length <= CAP)
    rows = (start + pos).to(tl.int64)[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_rotated(X + h * stride_xh + rows * stride_xt, ok, _table_rows(rows, seg, stride_ct, stride_cs),
                      COS, SIN, offs_d, head_dim, half, True)
    _store_cols(Y + h * stride_yh + rows * stride_yt, x, ok, offs_d, head_dim)


@triton.jit
def _attention_short_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, COS, SIN, SEED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    stride_ct, stride_cs, half, tokens_q, tokens_k,
    batch, head_dim: tl.constexpr, group, scale_log2, window_left, window_right, drop_threshold, keep_scale,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ROTARY: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    SEGS: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr, SLOT_K: tl.constexpr,
    HEAD_D0: tl.constexpr, HEAD_D1: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    # Row strides are multiples of ROW_ALIGN (the launcher checked): whole-vector rows.
    stride_qt, stride_qh = _aligned2(stride_qt, stride_qh, ROW_ALIGN)
    stride_kt, stride_kh = _aligned2(stride_kt, stride_kh, ROW_ALIGN)
    stride_vt, stride_vh = _aligned2(stride_vt, stride_vh, ROW_ALIGN)
    stride_ot, stride_oh = _aligned2(stride_ot, stride_oh, ROW_ALIGN)
    pid = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // group
    first_seg = (pid // SPLIT) * SEGS
    seg_r, pos_r, q_start, len_q, len_k_r = _rows(CU_Q, CU_K, first_seg, pid % SPLIT, batch, tokens_q, tokens_k,
                                                  ROWS, SEGS, SPLIT, SLOT_K)
    row_ok = pos_r < len_q
    if tl.max(row_ok.to(tl.int32), 0) == 0:  # a chunk past every segment of the group
        return
    seg_c, pos_c, k_start, len_k_c = _columns(CU_Q, CU_K, first_seg, batch, tokens_q, tokens_k, SLOT_K, SEGS,
                                              ROWS * SPLIT)
    offs_d = tl.arange(0, HEAD_D0)  # head-dim pieces (_head_dim.py): offs_d, then the tail offs_t
    k_ok = pos_c < len_k_c

    rows_q = (q_start + pos_r).to(tl.int64)[:, None]
    rows_k = (k_start + pos_c).to(tl.int64)[:, None]
    q_table = _table_rows(rows_q, seg_r, stride_ct, stride_cs)
    k_table = _table_rows(rows_k, seg_c, stride_ct, stride_cs)
    Q_rows = Q + h * stride_qh + rows_q * stride_qt
    K_rows = K + hk * stride_kh + rows_k * stride_kt
    V_rows = V + hk * stride_vh + rows_k * stride_vt
    q = _load_rotated(Q_rows, row_ok, q_table, COS, SIN, offs_d, head_dim, half, ROTARY)
    k = _load_rotated(K_rows, k_ok, k_table, COS, SIN, offs_d, head_dim, half, ROTARY)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if HEAD_D1 > 0:  # q.k reduces over the head dim: add the tail piece's dot
        offs_t = HEAD_D0 + tl.arange(0, HEAD_D1)
        q1 = _load_rotated(Q_rows, row_ok, q_table, COS, SIN, offs_t, head_dim, half, ROTARY)
        k1 = _load_rotated(K_rows, k_ok, k_table, COS, SIN, offs_t, head_dim, half, ROTARY)
        s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
    s = s * scale_log2
    visible = _block_diagonal(seg_r, pos_r, len_q, len_k_r, seg_c, pos_c, len_k_c,
                              window_left, window_right, HAS_LEFT, HAS_RIGHT)
    s = tl.where(visible, s, float("-inf"))
    m = tl.max(s, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # rows that see nothing: avoid inf - inf
    p = tl.exp2(s - m_safe[:, None])
    l = tl.sum(p, 1)
    if DROPOUT:  # l sums every p (lse is undropped); only kept ones reach acc
        keep = dropout_keep(SEED, q_start + pos_r, h + pos_r * 0, _key_quads(SEGS, SLOT_K), drop_threshold,
                            SEGS * ROWS, SEGS * SLOT_K)
        p = tl.where(keep, p, 0.0)
    seen = l > 0.0
    l_safe = tl.where(seen, l, 1.0)
    O_rows = O + h * stride_oh + rows_q * stride_ot
    p = p.to(V.dtype.element_ty)
    # p v produces head-dim columns: one dot and store per piece.
    acc = tl.dot(p, _load_cols(V_rows, k_ok, offs_d, head_dim), input_precision=PRECISION)
    _store_cols(O_rows, _normalise(acc, l_safe, keep_scale, DROPOUT).to(O.dtype.element_ty), row_ok, offs_d, head_dim)
    if HEAD_D1 > 0:
        acc1 = tl.dot(p, _load_cols(V_rows, k_ok, offs_t, head_dim), input_precision=PRECISION)
        _store_cols(O_rows, _normalise(acc1, l_safe, keep_scale, DROPOUT).to(O.dtype.element_ty), row_ok, offs_t,
                    head_dim)
    lse = tl.where(seen, (m_safe + tl.log2(l_safe)) * _LN2, float("-inf"))
    tl.store(LSE + h.to(tl.int64) * stride_lh + q_start + pos_r, lse, mask=row_ok)


@triton.jit
def _attention_short_bwd_kernel(
    Q, K, V, DO, DLSE, DQ, DK, DV, CU_Q, CU_K, COS, SIN, SEED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    stride_ct, stride_cs, half, tokens_q, tokens_k,
    batch, head_dim: tl.constexpr, group, scale, window_left, window_right, drop_threshold, keep_scale,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_DLSE: tl.constexpr, ROTARY: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    SEGS: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr, SLOT_K: tl.constexpr,
    HEAD_D0: tl.constexpr, HEAD_D1: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    # Row strides are multiples of ROW_ALIGN (the launcher checked): whole-vector rows.
    stride_qt, stride_qh = _aligned2(stride_qt, stride_qh, ROW_ALIGN)
    stride_kt, stride_kh = _aligned2(stride_kt, stride_kh, ROW_ALIGN)
    stride_vt, stride_vh = _aligned2(stride_vt, stride_vh, ROW_ALIGN)
    stride_dot, stride_doh = _aligned2(stride_dot, stride_doh, ROW_ALIGN)
    stride_dqt, stride_dqh = _aligned2(stride_dqt, stride_dqh, ROW_ALIGN)
    stride_dkt, stride_dkh = _aligned2(stride_dkt, stride_dkh, ROW_ALIGN)
    stride_dvt, stride_dvh = _aligned2(stride_dvt, stride_dvh, ROW_ALIGN)
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    first_seg = pid * SEGS
    seg_c, pos_c, k_start, len_k_c = _columns(CU_Q, CU_K, first_seg, batch, tokens_q, tokens_k, SLOT_K, SEGS,
                                              ROWS * SPLIT)
    offs_d = tl.arange(0, HEAD_D0)  # head-dim pieces (_head_dim.py): offs_d, then the tail offs_t
    rows_k = (k_start + pos_c).to(tl.int64)[:, None]
    k_ok = pos_c < len_k_c
    k_table = _table_rows(rows_k, seg_c, stride_ct, stride_cs)
    K_rows = K + hk * stride_kh + rows_k * stride_kt
    V_rows = V + hk * stride_vh + rows_k * stride_vt
    k = _load_cols(K_rows, k_ok, offs_d, head_dim)  # q and k: rotated by the launcher
    v = _load_cols(V_rows, k_ok, offs_d, head_dim)
    dk = tl.zeros((SEGS * SLOT_K, HEAD_D0), dtype=tl.float32)
    dv = tl.zeros((SEGS * SLOT_K, HEAD_D0), dtype=tl.float32)
    offs_t = offs_d
    if HEAD_D1 > 0:
        offs_t = HEAD_D0 + tl.arange(0, HEAD_D1)
        k1 = _load_cols(K_rows, k_ok, offs_t, head_dim)
        v1 = _load_cols(V_rows, k_ok, offs_t, head_dim)
        dk1 = tl.zeros((SEGS * SLOT_K, HEAD_D1), dtype=tl.float32)
        dv1 = tl.zeros((SEGS * SLOT_K, HEAD_D1), dtype=tl.float32)
    scale_log2 = scale * _LOG2E

    # Query heads of the group, then query chunks, in a fixed order: deterministic sums.
    for g in range(0, group):
        h = hk * group + g
        for chunk in range(0, SPLIT):
            seg_r, pos_r, q_start, len_q, len_k_r = _rows(CU_Q, CU_K, first_seg, chunk, batch, tokens_q, tokens_k,
                                                          ROWS, SEGS, SPLIT, SLOT_K)
            row_ok = pos_r < len_q
            rows_q = (q_start + pos_r).to(tl.int64)[:, None]
            q_table = _table_rows(rows_q, seg_r, stride_ct, stride_cs)
            Q_rows = Q + h * stride_qh + rows_q * stride_qt
            DO_rows = DO + h * stride_doh + rows_q * stride_dot
            q = _load_cols(Q_rows, row_ok, offs_d, head_dim)
            do = _load_cols(DO_rows, row_ok, offs_d, head_dim)
            # Transposed tiles ([keys, queries]): p^T and ds^T feed the dv, dk dots with
            # no register transpose (dq takes the one transpose left).
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            if HEAD_D1 > 0:  # k.q and v.dO reduce over the head dim: add the tail's dots
                q1 = _load_cols(Q_rows, row_ok, offs_t, head_dim)
                do1 = _load_cols(DO_rows, row_ok, offs_t, head_dim)
                s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=PRECISION)
                dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=PRECISION)
            visible_t = _sees(seg_r[None, :], pos_r[None, :], len_q[None, :], len_k_r[None, :],
                              seg_c[:, None], pos_c[:, None], len_k_c[:, None],
                              window_left, window_right, HAS_LEFT, HAS_RIGHT)
            p_t = _softmax_t(tl.where(visible_t, s_t * scale_log2, float("-inf")))
            p_kept = p_t
            if DROPOUT:  # dv through the dropped probabilities; dp back through the mask
                keep = tl.trans(dropout_keep(SEED, q_start + pos_r, h + pos_r * 0, _key_quads(SEGS, SLOT_K),
                                             drop_threshold, SEGS * ROWS, SEGS * SLOT_K))
                p_kept = tl.where(keep, p_t * keep_scale, 0.0)
                dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
            p_kept = p_kept.to(do.dtype)
            dv += tl.dot(p_kept, do, input_precision=PRECISION)
            dp_centred = dp_t - tl.sum(p_t * dp_t, 0)[None, :]
            if HAS_DLSE:
                # Added after centring, not folded into delta: a row with one key then
                # gets exactly dLSE, as eager attention does.
                dlse = tl.load(DLSE + h.to(tl.int64) * stride_lh + q_start + pos_r, mask=row_ok, other=0.0)
                dp_centred += dlse[None, :]
            ds_t = (p_t * dp_centred).to(k.dtype)
            ds = tl.trans(ds_t)
            dq = tl.dot(ds, k, input_precision=PRECISION) * scale
            dk += tl.dot(ds_t, q, input_precision=PRECISION)
            dq1 = dq
            if HEAD_D1 > 0:  # ds k, p^T dO, ds^T q produce head-dim columns: one accumulator per piece
                dq1 = tl.dot(ds, k1, input_precision=PRECISION) * scale
                dv1 += tl.dot(p_kept, do1, input_precision=PRECISION)
                dk1 += tl.dot(ds_t, q1, input_precision=PRECISION)
            if ROTARY:  # dq is wrt the rotated q: back to q's frame
                dq, dq1 = _rotate_back(dq, dq1, row_ok, q_table, COS, SIN, offs_d, offs_t, half, HEAD_D0, HEAD_D1)
            DQ_rows = DQ + h * stride_dqh + rows_q * stride_dqt
            _store_cols(DQ_rows, dq.to(DQ.dtype.element_ty), row_ok, offs_d, head_dim)
            if HEAD_D1 > 0:
                _store_cols(DQ_rows, dq1.to(DQ.dtype.element_ty), row_ok, offs_t, head_dim)

    dk *= scale
    if HEAD_D1 > 0:
        dk1 *= scale
    else:
        dk1 = dk  # placeholders: there is no tail piece
        dv1 = dv
    if ROTARY:  # dk is wrt the rotated k: back to k's frame
        dk, dk1 = _rotate_back(dk, dk1, k_ok, k_table, COS, SIN, offs_d, offs_t, half, HEAD_D0, HEAD_D1)
    DK_rows = DK + hk * stride_dkh + rows_k * stride_dkt
    DV_rows = DV + hk * stride_dvh + rows_k * stride_dvt
    _store_cols(DK_rows, dk.to(DK.dtype.element_ty), k_ok, offs_d, head_dim)
    _store_cols(DV_rows, dv.to(DV.dtype.element_ty), k_ok, offs_d, head_dim)
    if HEAD_D1 > 0:
        _store_cols(DK_rows, dk1.to(DK.dtype.element_ty), k_ok, offs_t, head_dim)
        _store_cols(DV_rows, dv1.to(DV.dtype.element_ty), k_ok, offs_t, head_dim)


# ---- launchers -------------------------------------------------------------------


def _plan(device: torch.device, max_seqlen_q: int, max_seqlen_k: int, backward: bool, dropout: bool = False):
    """(SEGS, ROWS, SPLIT, SLOT_K, num_warps): how segments map onto tiles.

    A tile aims at ``tile`` rows and key columns: segments shorter than that share one
    (SEGS of them); a query slot longer than ``max_rows`` is split over SPLIT chunks. Every
    tile side is a power of two and at least 16 (tl.dot's minimum). Untuned on GPUs:
    starting points to be measured. The interpreter gets small tiles, so that CPU tests
    with a few dozen tokens still put several segments in one tile. Dropout takes key
    slots of at least 4 (its Philox draws serve four neighbouring keys of one segment).
    """
    gpu = device.type == "cuda"
    tile = 64 if gpu else 16
    max_rows = (64 if backward else 128) if gpu else 16
    slot_q = triton.next_power_of_2(max(max_seqlen_q, 1))
    slot_k = triton.next_power_of_2(max(max_seqlen_k, 1))
    segs = max(1, min(tile // slot_q, tile // slot_k))
    rows = min(slot_q, max_rows)
    split = slot_q // rows
    rows = max(rows, 16 // segs)  # pad tiny slots up to tl.dot's 16 (extra rows are masked)
    slot_k = max(slot_k, 16 // segs, 4 if dropout else 1)
    # Two warpgroups from 64-row tiles up: with four warps the rotary and head dims 80-128
    # spilled on sm_90a (scripts/sm90_attention_resources.py).
    num_warps = (8 if max(segs * rows, segs * slot_k) >= 64 else 4) if gpu else 1
    return segs, rows, split, slot_k, num_warps


def _precision(dtype: torch.dtype) -> str:
    # IEEE float32 dots for float32 inputs: TF32 would be less accurate than the reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _rotary_args(q, cos, sin, table_seg_stride: int) -> tuple:
    """(COS, SIN, token stride, segment stride, half) for the kernels: tables [rows, R/2]
    with their last dim contiguous, sin with the strides of cos. Without rotary: placeholders."""
    if cos is None:
        return q, q, 0, 0, 0
    if cos.dim() != 2 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        # A copy would invalidate table_seg_stride, which is in units of cos's strides.
        raise ValueError(f"cos, sin: expected 2-d tables with a unit last stride and equal strides, got "
                         f"strides {cos.stride()} and {sin.stride()}")
    return cos, sin, cos.stride(0), table_seg_stride, cos.shape[-1]


def _rotated(x, cu_seqlens, cap: int, rotary: tuple) -> torch.Tensor:
    """The tokens of x's segments of at most ``cap`` tokens (those the kernel's slots take)
    rotated, as the fused rotation rounds them (others are left unwritten: no kernel reads
    them). The backward reads these copies: rotating the q and k tiles inside it spilled
    registers on sm_90a."""
    table_cos, table_sin, stride_ct, stride_cs, half = rotary
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    batch = cu_seqlens.numel() - 1
    if batch == 0 or x.numel() == 0:
        return y
    ROWS = min(triton.next_power_of_2(cap), 32)
    SPLIT = triton.cdiv(cap, ROWS)
    _attention_short_rotate_kernel[(batch * SPLIT, x.shape[1])](
        x, y, cu_seqlens, table_cos, table_sin, *x.stride()[:2], *y.stride()[:2], stride_ct, stride_cs, half,
        batch, x.shape[0], x.shape[-1], CAP=cap, ROWS=ROWS, SPLIT=SPLIT,
        BLOCK_D=triton.next_power_of_2(x.shape[-1]),
    )
    return y


def _check_sizes(max_seqlen_q: int, max_seqlen_k: int, head_dim: int) -> None:
    if max(max_seqlen_q, max_seqlen_k) > MAX_SEQLEN or head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"short-segment attention takes segments of at most {MAX_SEQLEN} tokens and head dims "
            f"of at most {MAX_HEAD_DIM}, got max_seqlen_q={max_seqlen_q}, "
            f"max_seqlen_k={max_seqlen_k}, head dim {head_dim}"
        )


def attention_short_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                        window_left: int, window_right: int, scale: float, cos=None, sin=None,
                        table_seg_stride: int = 0, seed=None, dropout_p: float = 0.0):
    """Forward over packed segments of at most MAX_SEQLEN tokens. Returns (out, lse): out
    like q (contiguous), lse float32 [Hq, Tq]. The last dim of q, k, v must be contiguous;
    max_seqlen_* must bound every segment (they size the slots; nothing is read back).

    ``cos``, ``sin`` (or None): 2-D rotary tables applied to q and k as they are loaded
    (q and k then have the same tokens); token t of segment b reads the table row at
    offset ``t * cos.stride(0) + b * table_seg_stride`` (0 for packed tables). ``seed`` and
    ``dropout_p`` > 0: attention dropout, the mask of kernels/attention_dropout.py.

    A segment longer than max_seqlen_* (a caller's mistake that cannot be seen without a
    sync) does not fit its slot: the general kernel then runs it, in a second launch whose
    programs skip every segment that fits. cu_seqlens values are clamped on the device."""
    heads, head_dim = q.shape[-2], q.shape[-1]
    _check_sizes(max_seqlen_q, max_seqlen_k, head_dim)
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    cu_seqlens_q, cu_seqlens_k = dense(cu_seqlens_q), dense(cu_seqlens_k)
    batch = cu_seqlens_q.numel() - 1
    out = empty(q.shape, dtype=q.dtype, device=q.device)
    lse = empty((heads, q.shape[0]), dtype=torch.float32, device=q.device)
    if batch == 0 or heads == 0 or q.numel() == 0:
        return out, lse
    SEGS, ROWS, SPLIT, SLOT_K, num_warps = _plan(q.device, max_seqlen_q, max_seqlen_k, backward=False,
                                                 dropout=dropout_p > 0)
    grid = (triton.cdiv(batch, SEGS) * SPLIT, heads)
    table_cos, table_sin, stride_ct, stride_cs, half = _rotary_args(q, cos, sin, table_seg_stride)
    _attention_short_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, table_cos, table_sin,
        seed if seed is not None else cu_seqlens_q,
        *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2], lse.stride(0),
        stride_ct, stride_cs, half, q.shape[0], k.shape[0],
        batch, head_dim, heads // k.shape[-2], scale * LOG2E, window_left, window_right,
        *_dropout_args(dropout_p),
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, ROTARY=cos is not None,
        DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype),
        SEGS=SEGS, ROWS=ROWS, SPLIT=SPLIT, SLOT_K=SLOT_K, **_pieces(head_dim, q, k, v, out),
        num_warps=num_warps, num_stages=1,
    )
    attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, 1, 1, window_left, window_right, scale, cos, sin,
                  seed, dropout_p, skip_up_to=(ROWS * SPLIT, SLOT_K), into=(out, lse), table_seg_stride=stride_cs)
    return out, lse


def attention_short_bwd(do, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q: int, max_seqlen_k: int, window_left: int, window_right: int,
                        scale: float, cos=None, sin=None, table_seg_stride: int = 0,
                        seed=None, dropout_p: float = 0.0):
    """Backward of :func:`attention_short_fwd` in one launch. Returns (dq, dk, dv) in the
    dtypes and shapes of q, k, v. ``dlse`` is the gradient of lse, or None. ``out`` and
    ``lse`` are unused (the signature is the general kernel's): the tile recomputes the
    softmax and delta itself. Segments of more than BWD_MAX_KEYS keys (max_seqlen_k) run
    the general kernels' backward instead, which uses them. With rotary tables (as in the forward), dq and dk are the
    gradients wrt the unrotated q and k. ``seed``, ``dropout_p``: those of the forward.
    Segments too long for their slots go to the general kernels, as in the forward."""
    heads, kv_heads, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    _check_sizes(max_seqlen_q, max_seqlen_k, head_dim)
    do, q, k, v, out = (unit_last(t) for t in (do, q, k, v, out))
    lse, dlse, cu_seqlens_q, cu_seqlens_k = dense(lse), dense(dlse), dense(cu_seqlens_q), dense(cu_seqlens_k)
    batch = cu_seqlens_q.numel() - 1
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=k.device)
    dv = empty(v.shape, dtype=v.dtype, device=v.device)
    if batch == 0 or heads == 0 or q.numel() == 0 or k.numel() == 0:
        # Nothing attends: every gradient is zero (and must be written).
        return dq.zero_(), dk.zero_(), dv.zero_()
    table_cos, table_sin, stride_ct, stride_cs, half = _rotary_args(q, cos, sin, table_seg_stride)
    if triton.next_power_of_2(max(max_seqlen_k, 1)) > BWD_MAX_KEYS:  # see BWD_MAX_KEYS
        return attention_bwd(do, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             window_left, window_right, scale, cos, sin, seed, dropout_p,
                             table_seg_stride=stride_cs)
    SEGS, ROWS, SPLIT, SLOT_K, num_warps = _plan(q.device, max_seqlen_q, max_seqlen_k, backward=True,
                                                 dropout=dropout_p > 0)
    if cos is not None:  # the kernel reads rotated copies and rotates dq, dk back (see _rotated)
        rotary = (table_cos, table_sin, stride_ct, stride_cs, half)
        q_rot = _rotated(q, cu_seqlens_q, ROWS * SPLIT, rotary)
        k_rot = _rotated(k, cu_seqlens_k, SLOT_K, rotary)
    else:
        q_rot, k_rot = q, k
    _attention_short_bwd_kernel[(triton.cdiv(batch, SEGS), kv_heads)](
        q_rot, k_rot, v, do, dlse if dlse is not None else lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
        table_cos, table_sin, seed if seed is not None else cu_seqlens_q,
        *q_rot.stride()[:2], *k_rot.stride()[:2], *v.stride()[:2], *do.stride()[:2],
        *dq.stride()[:2], *dk.stride()[:2], *dv.stride()[:2], lse.stride(0),
        stride_ct, stride_cs, half, q.shape[0], k.shape[0],
        batch, head_dim, heads // kv_heads, scale, window_left, window_right, *_dropout_args(dropout_p),
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_DLSE=dlse is not None,
        ROTARY=cos is not None, DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype),
        SEGS=SEGS, ROWS=ROWS, SPLIT=SPLIT, SLOT_K=SLOT_K, **_pieces(head_dim, q_rot, k_rot, v, do, dq, dk, dv),
        num_warps=num_warps, num_stages=1,
    )
    # The general kernels take the segments too long for the slots (rotating their own copies).
    attention_bwd(do, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, 1, 1, window_left, window_right,
                  scale, cos, sin, seed, dropout_p, skip_up_to=(ROWS * SPLIT, SLOT_K), into=(dq, dk, dv),
                  table_seg_stride=stride_cs)
    return dq, dk, dv
