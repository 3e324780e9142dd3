"""Triton kernels for scaled dot-product attention, flash-attention style, in one set of
kernels for both layouts:

- packed (varlen): Q [Tq, Hq, D], K/V [Tk, Hk, D]; segment b holds tokens
  cu_seqlens[b] .. cu_seqlens[b+1] (int32, length B+1), read on the device;
- padded: Q [B, Tq, Hq, D], K/V [B, Tk, Hk, D]; every batch entry is one segment,
  reached through the batch stride.

Query i of a segment with lq queries and lk keys sits at key position i + lk - lq
(bottom-right alignment, as flash-attn >= 2.1) and sees key j when
    j - (i + lk - lq) in [-window_left, window_right]     (-1: unbounded side)
Causal attention is window_right = 0 (the op layer converts it).

Forward (one program per BLOCK_M queries of one head of one segment), online softmax in
float32 with exp2, scores in log2 units (s2 = q.k * scale * log2(e)):
    m = running max of s2, l = running sum of 2^(s2 - m), acc = running sum of 2^(s2 - m) v
    out = acc / l,  lse = (m + log2 l) * ln 2      (natural log of sum exp(scale q.k))
A query that sees no key (empty key segment, or a window that excludes every key)
gets out = 0 and lse = -inf.

Backward, deterministic (no atomics), with delta = rowsum(dO * O) - dLSE:
    p = exp(scale q.k - lse),  dv = sum_q p dO,  dp = dO.v,  ds = p (dp - delta)
    dk = scale sum_q ds q  (one program per BLOCK_N keys of one K/V head, looping over
                            the query heads of its group and the query blocks that see it)
    dq = scale sum_k ds k  (one program per BLOCK_M queries, looping over key blocks)
Subtracting dLSE from delta makes lse differentiable: d lse / d s = p.

Rotary (ROTARY=True): rotate-half over the first R = 2 * half columns of q and k, by
per-token angles from half-width tables COS, SIN ([T, R/2], or [B, T, R/2] padded; row t
is token t, for q and k alike):
    x_rot[j] = x[j] cos_j - x[j + half] sin_j,  x_rot[j + half] = x[j + half] cos_j + x[j] sin_j
rounded to the input dtype, as a separate rotary pass would store it. The forward rotates
its q tile as it loads it (once per program; the partner columns come from a second load
with permuted column offsets, a cache hit); k, which every query block of a segment
reads again, is rotated once by _attention_rotate_kernel before the launch (rotating
each k tile inside the key loop spilled registers on sm_90a). The backward reads rotated
copies of q and k the same way, and turns dq and dk (gradients wrt the rotated q, k) back
with the transpose (sin negated) before the store; there the partner columns come from
a register gather of the accumulator's pieces.

QK norm (QK_NORM=True, ``qk_norm`` in the launchers): every head of q and k RMS-normalised
over D before the rotation, as a separate rms_norm pass would store it:
    x_n = x / sqrt(mean(x^2) + eps) * w      (float32, rounded to the input dtype)
The forward normalises its q tile as it loads it, when the head dim is one piece (the
whole row is in the tile); at head dims in two pieces (72, 80) that spilled on sm_90a, so
there q, like k always, is normalised (and rotated) by _attention_rotate_kernel before
the launch. The backward's copies of q and k are normalised before they are rotated, the
pass keeping 1 / rms of each row; the kernels then give dq, dk wrt the normalised q, k,
and the RMSNorm backward (kernels/norm.py) maps them to the raw q, k and the weights.

Dropout (DROPOUT=True; attention_dropout.py): each score tile regenerates its keep-mask Z
(kept entries 1 / (1 - p), others 0) from the seed; the forward accumulates acc with
p Z (l, hence lse, sums the undropped p), and the backward uses
    dv = sum_q (p Z) dO,  dp = Z (dO.v),  ds = p (dp - delta)
where delta = rowsum(dO * O) still equals rowsum(p dp) with the dropped O. DROPOUT=False
compiles exactly the kernels without dropout.

The head dim is tiled as at most two power-of-two pieces (kernels/_head_dim.py: 80 = 64 +
16, 72 = 64 + 16 masked) rather than padded to next_pow2(D): dots that reduce over D add
the pieces' dots, dots that produce D columns keep one accumulator per piece, and the
backward's rotation gathers a partner column from whichever piece holds it. float32
inputs use IEEE dots (no TF32), so they are as exact as the reference.
"""

import torch
import triton
import triton.language as tl

from ._head_dim import head_dim_pieces, row_align
from ._launch import dense, empty, unit_last
from .attention_dropout import dropout_keep
from .norm import norm_bwd

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _aligned2(stride_t, stride_h, ROW_ALIGN: tl.constexpr):
    """Row strides, known to the compiler as multiples of ROW_ALIGN (the launcher checked
    that they are: kernels/_head_dim.py row_align), so that a row of any head dim starts
    a whole vector."""
    return stride_t // ROW_ALIGN * ROW_ALIGN, stride_h // ROW_ALIGN * ROW_ALIGN


@triton.jit
def _aligned3(stride_b, stride_t, stride_h, ROW_ALIGN: tl.constexpr):
    """_aligned2 with a batch stride."""
    stride_t, stride_h = _aligned2(stride_t, stride_h, ROW_ALIGN)
    return stride_b // ROW_ALIGN * ROW_ALIGN, stride_t, stride_h


@triton.jit
def _segment(CU, b, padded_len, tokens, VARLEN: tl.constexpr):
    """(first token, length) of segment b: from cu_seqlens, or the padded length.

    cu_seqlens values are clamped into [0, tokens] and a segment ending before it starts
    is empty, so whatever they hold, no token index leaves the tensor."""
    if VARLEN:
        start = tl.minimum(tl.maximum(tl.load(CU + b), 0), tokens)
        length = tl.minimum(tl.maximum(tl.load(CU + b + 1), start), tokens) - start
    else:
        start = b * 0
        length = b * 0 + padded_len
    return start, length


@triton.jit
def _visible(offs_m, offs_n, len_q, len_k, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[M, N] mask: query offs_m sees key offs_n (bottom-right aligned window)."""
    return _sees(offs_m[:, None], offs_n[None, :], len_q, len_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)


@triton.jit
def _sees(q_pos, k_pos, len_q, len_k, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query position q_pos sees key position k_pos, broadcast ([M, 1] and [1, N] give
    [M, N]; [1, M] and [N, 1] the transposed mask)."""
    diag = q_pos + (len_k - len_q)
    ok = (q_pos < len_q) & (k_pos < len_k)
    if HAS_LEFT:
        ok &= k_pos >= diag - window_left
    if HAS_RIGHT:
        ok &= k_pos <= diag + window_right
    return ok


@triton.jit
def _key_range(m_first, m_end, len_q, len_k, window_left, window_right,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) that queries [m_first, m_end) may see; lo a multiple of BLOCK_N."""
    lo = len_k * 0
    hi = len_k
    shift = len_k - len_q
    if HAS_LEFT:
        lo = tl.maximum(lo, m_first + shift - window_left)
    if HAS_RIGHT:
        hi = tl.minimum(hi, tl.minimum(m_end, len_q) - 1 + shift + window_right + 1)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _rotary_columns(offs_d, half):
    """Per column: inside the rotated part, in its first half, angle index, partner column."""
    in_rot = offs_d < 2 * half
    first = offs_d < half
    pair = tl.where(first, offs_d, offs_d - half)
    partner = tl.where(first, offs_d + half, offs_d - half)
    return in_rot, first, pair, tl.where(in_rot, partner, offs_d)


@triton.jit
def _load_rotated(rows_ptr, row_ok, table_rows, COS, SIN, offs_d, head_dim, half, ROTARY: tl.constexpr):
    """Load columns offs_d of a [rows, D] tile (rows_ptr: [rows, 1] row pointers); with ROTARY, rotated
    by its tokens' angles (table_rows: [rows, 1] offsets into COS, SIN), in float32, rounded
    back to the input dtype."""
    x = tl.load(rows_ptr + offs_d[None, :], mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    # No norm (NORM=False): the weight pointer and 1/rms slots are placeholders it never reads.
    return _prepare_tile(x, rows_ptr, row_ok, table_rows, COS, SIN, offs_d, head_dim, half, ROTARY,
                         COS, half, False, False)


@triton.jit
def _tile_rstd(x, head_dim: tl.constexpr, eps):
    """1 / sqrt(mean(x^2) + eps) of each row of a tile that holds the whole head dim (zeros
    past it), in float32, as mmfast's rms_norm computes it."""
    xf = x.to(tl.float32)
    return tl.math.rsqrt(tl.sum(xf * xf, 1) * (1.0 / head_dim) + eps)


@triton.jit
def _normed(x, W, cols, rstd, head_dim, HAS_W: tl.constexpr):
    """x * rstd (per row) * W[cols], in float32, rounded to x's dtype as rms_norm stores it."""
    y = x.to(tl.float32) * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cols < head_dim, other=0.0).to(tl.float32)[None, :]
    return y.to(x.dtype)


@triton.jit
def _prepare_tile(x, rows_ptr, row_ok, table_rows, COS, SIN, offs_d, head_dim, half, ROTARY: tl.constexpr,
                  W, rstd, NORM: tl.constexpr, HAS_W: tl.constexpr):
    """x, the columns offs_d of a [rows, D] tile loaded from rows_ptr, prepared for the dots:
    with NORM, RMS-normalised (times the per-row rstd, then the weight W when HAS_W,
    rounded to the input dtype: rms_norm's output), then with ROTARY rotated (the partner
    columns loaded again, normalised alike)."""
    if NORM:
        x = _normed(x, W, offs_d, rstd, head_dim, HAS_W)
    if ROTARY:
        in_rot, first, pair, partner = _rotary_columns(offs_d, half)
        rot_mask = row_ok[:, None] & in_rot[None, :]
        x_partner = tl.load(rows_ptr + partner[None, :], mask=rot_mask, other=0.0)
        if NORM:
            x_partner = _normed(x_partner, W, partner, rstd, head_dim, HAS_W)
        at = table_rows + pair[None, :]
        cos = tl.load(COS + at, mask=rot_mask, other=1.0).to(tl.float32)
        sin = tl.load(SIN + at, mask=rot_mask, other=0.0).to(tl.float32)
        sin = tl.where(first[None, :], -sin, sin)
        x = (x.to(tl.float32) * cos + x_partner.to(tl.float32) * sin).to(x.dtype)
    return x


@triton.jit
def _load_cols(rows_ptr, row_ok, offs_d, head_dim):
    """Columns offs_d of a [rows, D] tile (rows_ptr: [rows, 1] row pointers); 0 past head_dim."""
    return tl.load(rows_ptr + offs_d[None, :], mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)


@triton.jit
def _store_cols(rows_ptr, x, row_ok, offs_d, head_dim):
    """Store x into columns offs_d (those below head_dim) of the rows that are ok."""
    tl.store(rows_ptr + offs_d[None, :], x, mask=row_ok[:, None] & (offs_d < head_dim)[None, :])


@triton.jit
def _normalise(acc, l_safe, keep_scale, DROPOUT: tl.constexpr):
    """The forward's output piece acc / l (scaled by 1 / (1 - p) with dropout)."""
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * keep_scale
    return out


@triton.jit
def _partner_values(acc, acc0, acc1, partner, HEAD_D0: tl.constexpr, HEAD_D1: tl.constexpr):
    """Like acc ([rows, len(partner)]): column ``partner`` of the head-dim tile held as
    pieces acc0 (columns [0, HEAD_D0)) and acc1 (the next HEAD_D1; unused when 0)."""
    idx0 = tl.broadcast_to(tl.minimum(partner, HEAD_D0 - 1)[None, :], acc.shape)
    vals = tl.gather(acc0, idx0, axis=1)
    if HEAD_D1 > 0:
        idx1 = tl.minimum(tl.maximum(partner - HEAD_D0, 0), HEAD_D1 - 1)
        from1 = tl.gather(acc1, tl.broadcast_to(idx1[None, :], acc.shape), axis=1)
        vals = tl.where((partner >= HEAD_D0)[None, :], from1, vals)
    return vals


@triton.jit
def _rotate_back_cols(acc, acc0, acc1, row_ok, table_rows, COS, SIN, offs_d, half,
                      HEAD_D0: tl.constexpr, HEAD_D1: tl.constexpr):
    """The transpose of the rotation on columns offs_d (the piece ``acc``) of a float32
    gradient held as pieces acc0, acc1 (the partner column may lie in the other piece)."""
    in_rot, first, pair, partner = _rotary_columns(offs_d, half)
    rot_mask = row_ok[:, None] & in_rot[None, :]
    acc_partner = _partner_values(acc, acc0, acc1, partner, HEAD_D0, HEAD_D1)
    at = table_rows + pair[None, :]
    cos = tl.load(COS + at, mask=rot_mask, other=1.0).to(tl.float32)
    sin = tl.load(SIN + at, mask=rot_mask, other=0.0).to(tl.float32)
    sin = tl.where(first[None, :], sin, -sin)
    return acc * cos + acc_partner * sin


@triton.jit
def _rotate_back(acc0, acc1, row_ok, table_rows, COS, SIN, offs_d, offs_t, half,
                 HEAD_D0: tl.constexpr, HEAD_D1: tl.constexpr):
    """The transpose of the rotation, on a float32 gradient held as head-dim pieces acc0
    (columns offs_d) and acc1 (columns offs_t; ignored when HEAD_D1 = 0)."""
    new0 = _rotate_back_cols(acc0, acc0, acc1, row_ok, table_rows, COS, SIN, offs_d, half, HEAD_D0, HEAD_D1)
    new1 = acc1
    if HEAD_D1 > 0:
        new1 = _rotate_back_cols(acc1, acc0, acc1, row_ok, table_rows, COS, SIN, offs_t, half, HEAD_D0, HEAD_D1)
    return new0, new1


@triton.jit
def _attention_fwd_block(
    pid_m, Q, K, V, O, LSE, CU_Q, CU_K, COS, SIN, SEED, QW,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh, stride_cb, stride_ct,
    seqlen_q, seqlen_k, head_dim: tl.constexpr, group, scale_log2, window_left, window_right, half,
    drop_threshold, keep_scale, tokens_q, tokens_k, norm_eps,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ROTARY: tl.constexpr,
    DROPOUT: tl.constexpr, QK_NORM: tl.constexpr, HAS_QW: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D0: tl.constexpr, HEAD_D1: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    # Row strides are multiples of ROW_ALIGN (the launcher checked): whole-vector rows.
    stride_qb, stride_qt, stride_qh = _aligned3(stride_qb, stride_qt, stride_qh, ROW_ALIGN)
    stride_kb, stride_kt, stride_kh = _aligned3(stride_kb, stride_kt, stride_kh, ROW_ALIGN)
    stride_vb, stride_vt, stride_vh = _aligned3(stride_vb, stride_vt, stride_vh, ROW_ALIGN)
    stride_ob, stride_ot, stride_oh = _aligned3(stride_ob, stride_ot, stride_oh, ROW_ALIGN)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start, len_q = _segment(CU_Q, b, seqlen_q, tokens_q, VARLEN)
    k_start, len_k = _segment(CU_K, b, seqlen_k, tokens_k, VARLEN)
    m_first = pid_m * BLOCK_M
    if m_first >= len_q:  # past the segment (the caller loops over its blocks)
        return
    hk = h // group
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    # The head dim as pieces (_head_dim.py): columns offs_d, then the tail offs_t.
    offs_d = tl.arange(0, HEAD_D0)
    m_ok = offs_m < len_q
    b64 = b.to(tl.int64)

    rows_q = (q_start + offs_m).to(tl.int64)
    offs_quad = tl.arange(0, BLOCK_N // 4)  # dropout: a Philox call per 4 keys
    Q_rows = Q + b64 * stride_qb + h * stride_qh + rows_q[:, None] * stride_qt
    q_table = b64 * stride_cb + rows_q[:, None] * stride_ct
    if QK_NORM:  # the q tile RMS-normalised over the head dim (one piece: the launcher checked), then rotated
        tl.static_assert(HEAD_D1 == 0, "QK_NORM on load needs the head dim in one piece")
        q = _load_cols(Q_rows, m_ok, offs_d, head_dim)
        q = _prepare_tile(q, Q_rows, m_ok, q_table, COS, SIN, offs_d, head_dim, half, ROTARY,
                          QW, _tile_rstd(q, head_dim, norm_eps), True, HAS_QW)
    else:
        q = _load_rotated(Q_rows, m_ok, q_table, COS, SIN, offs_d, head_dim, half, ROTARY)
    K_head = K + b64 * stride_kb + hk * stride_kh
    V_head = V + b64 * stride_vb + hk * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_D0), dtype=tl.float32)
    if HEAD_D1 > 0:
        offs_t = HEAD_D0 + tl.arange(0, HEAD_D1)
        q1 = _load_rotated(Q_rows, m_ok, q_table, COS, SIN, offs_t, head_dim, half, ROTARY)
        acc1 = tl.zeros((BLOCK_M, HEAD_D1), dtype=tl.float32)
    lo, hi = _key_range(m_first, m_first + BLOCK_M, len_q, len_k, window_left, window_right,
                        HAS_LEFT, HAS_RIGHT, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < len_k
        rows_k = (k_start + cols).to(tl.int64)[:, None]
        k = _load_cols(K_head + rows_k * stride_kt, n_ok, offs_d, head_dim)  # rotated by the launcher
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if HEAD_D1 > 0:  # q.k reduces over the head dim: add the tail piece's dot
            k1 = _load_cols(K_head + rows_k * stride_kt, n_ok, offs_t, head_dim)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
        s = s * scale_log2
        ok = _visible(offs_m, cols, len_q, len_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no key yet keep m = -inf; subtract 0 there to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_cols(V_head + rows_k * stride_vt, n_ok, offs_d, head_dim)
        if DROPOUT:  # l sums every p (lse is undropped); only kept ones reach acc
            keep = dropout_keep(SEED, b * seqlen_q + rows_q, h + offs_m * 0, start_n // 4 + offs_quad,
                                drop_threshold, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if HEAD_D1 > 0:  # p v produces head-dim columns: one accumulator per piece
            v1 = _load_cols(V_head + rows_k * stride_vt, n_ok, offs_t, head_dim)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    rows_o = (q_start + offs_m).to(tl.int64)
    O_rows = O + b64 * stride_ob + h * stride_oh + rows_o[:, None] * stride_ot
    _store_cols(O_rows, _normalise(acc, l_safe, keep_scale, DROPOUT).to(O.dtype.element_ty), m_ok, offs_d, head_dim)
    if HEAD_D1 > 0:
        _store_cols(O_rows, _normalise(acc1, l_safe, keep_scale, DROPOUT).to(O.dtype.element_ty), m_ok, offs_t,
                    head_dim)
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    tl.store(LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m, lse, mask=m_ok)


@triton.jit
def _attention_rotate_kernel(
    X, Y, CU_Q, CU_K, COS, SIN, W, RSTD,
    stride_xb, stride_xt, stride_xh, stride_yb, stride_yt, stride_yh, stride_cb, stride_ct,
    stride_rb, stride_rt, stride_rh,
    seqlen_q, seqlen_k, tokens_q, tokens_k, fit_q, fit_k, head_dim: tl.constexpr, half, norm_eps,
    VARLEN: tl.constexpr, BY_KEYS: tl.constexpr, ROTARY: tl.constexpr, NORM: tl.constexpr,
    HAS_W: tl.constexpr, STORE_RSTD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Y = X prepared as the forward prepares its q tiles on load: with NORM, RMS-normalised
    per head (weight W when HAS_W; 1 / rms stored to RSTD, [B, T, H] by its strides, with
    STORE_RSTD), then with ROTARY rotated; for the tokens of segment b = program_id(1) (of
    k's segments with BY_KEYS, else q's; cu_seqlens clamped as in _segment), token t by
    table row b * stride_cb + t * stride_ct as the main kernels index it, rounded to X's
    dtype. Programs loop over the segment's blocks (a grid stride apart), so no max_seqlen
    leaves a token unprepared; segments the short-segment kernel took (lengths <= fit_q,
    fit_k) are skipped."""
    b = tl.program_id(1)
    b64 = b.to(tl.int64)
    h = tl.program_id(2)
    if BY_KEYS:
        start, length = _segment(CU_K, b, seqlen_k, tokens_k, VARLEN)
    else:
        start, length = _segment(CU_Q, b, seqlen_q, tokens_q, VARLEN)
    blocks = _blocks_to_run(CU_Q, CU_K, b, seqlen_q, seqlen_k, tokens_q, tokens_k, fit_q, fit_k,
                            VARLEN, BY_KEYS, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    for block in range(tl.program_id(0), blocks, tl.num_programs(0)):
        offs_t = block * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = offs_t < length
        rows = (start + offs_t).to(tl.int64)[:, None]
        X_rows = X + b64 * stride_xb + h * stride_xh + rows * stride_xt
        x = _load_cols(X_rows, ok, offs_d, head_dim)
        rstd = ok.to(tl.float32)  # (a float row vector for the untaken NORM slot: never read without NORM)
        if NORM:  # the whole head dim is in the tile (BLOCK_D >= head_dim)
            rstd = _tile_rstd(x, head_dim, norm_eps)
            if STORE_RSTD:
                tl.store(RSTD + b64 * stride_rb + h * stride_rh + (start + offs_t).to(tl.int64) * stride_rt, rstd,
                         mask=ok)
        x = _prepare_tile(x, X_rows, ok, b64 * stride_cb + rows * stride_ct, COS, SIN, offs_d, head_dim, half, ROTARY,
                          W, rstd, NORM, HAS_W)
        _store_cols(Y + b64 * stride_yb + h * stride_yh + rows * stride_yt, x, ok, offs_d, head_dim)


@triton.jit
def _attention_bwd_preprocess_block(
    pid_m, O, DO, DLSE, DELTA, CU_Q,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh,
    seqlen_q, head_dim, tokens_q,
    VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start, len_q = _segment(CU_Q, b, seqlen_q, tokens_q, VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < len_q
    mask = m_ok[:, None] & (offs_d < head_dim)[None, :]
    b64 = b.to(tl.int64)
    rows = (q_start + offs_m).to(tl.int64)[:, None]
    o = tl.load(O + b64 * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + rows * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse_at = b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + lse_at, mask=m_ok, other=0.0)
    tl.store(DELTA + lse_at, delta, mask=m_ok)


@triton.jit
def _attention_bwd_dkdv_block(
    pid_n, Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, COS, SIN, SEED,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_lb, stride_lh, stride_cb, stride_ct,
    seqlen_q, seqlen_k, head_dim: tl.constexpr, group, scale, window_left, window_right, half,
    drop_threshold, keep_scale, tokens_q, tokens_k,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ROTARY: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D0: tl.constexpr, HEAD_D1: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    # Row strides are multiples of ROW_ALIGN (the launcher checked): whole-vector rows.
    stride_qb, stride_qt, stride_qh = _aligned3(stride_qb, stride_qt, stride_qh, ROW_ALIGN)
    stride_kb, stride_kt, stride_kh = _aligned3(stride_kb, stride_kt, stride_kh, ROW_ALIGN)
    stride_vb, stride_vt, stride_vh = _aligned3(stride_vb, stride_vt, stride_vh, ROW_ALIGN)
    stride_dob, stride_dot, stride_doh = _aligned3(stride_dob, stride_dot, stride_doh, ROW_ALIGN)
    stride_dkb, stride_dkt, stride_dkh = _aligned3(stride_dkb, stride_dkt, stride_dkh, ROW_ALIGN)
    stride_dvb, stride_dvt, stride_dvh = _aligned3(stride_dvb, stride_dvt, stride_dvh, ROW_ALIGN)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    q_start, len_q = _segment(CU_Q, b, seqlen_q, tokens_q, VARLEN)
    k_start, len_k = _segment(CU_K, b, seqlen_k, tokens_k, VARLEN)
    n_first = pid_n * BLOCK_N
    if n_first >= len_k:
        return
    offs_n = n_first + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D0)  # head-dim pieces (_head_dim.py): offs_d, then the tail offs_t
    b64 = b.to(tl.int64)
    rows_k = (k_start + offs_n).to(tl.int64)[:, None]
    n_ok = offs_n < len_k
    k_table = b64 * stride_cb + rows_k * stride_ct
    K_rows = K + b64 * stride_kb + hk * stride_kh + rows_k * stride_kt
    V_rows = V + b64 * stride_vb + hk * stride_vh + rows_k * stride_vt
    k = _load_cols(K_rows, n_ok, offs_d, head_dim)
    v = _load_cols(V_rows, n_ok, offs_d, head_dim)
    dk = tl.zeros((BLOCK_N, HEAD_D0), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_D0), dtype=tl.float32)
    offs_t = offs_d
    if HEAD_D1 > 0:
        offs_t = HEAD_D0 + tl.arange(0, HEAD_D1)
        k1 = _load_cols(K_rows, n_ok, offs_t, head_dim)
        v1 = _load_cols(V_rows, n_ok, offs_t, head_dim)
        dk1 = tl.zeros((BLOCK_N, HEAD_D1), dtype=tl.float32)
        dv1 = tl.zeros((BLOCK_N, HEAD_D1), dtype=tl.float32)
    scale_log2 = scale * _LOG2E

    # Queries [lo, hi) that may see keys [n_first, n_first + BLOCK_N): invert the window.
    shift = len_k - len_q
    lo = len_q * 0
    hi = len_q
    if HAS_RIGHT:
        lo = tl.maximum(lo, n_first - shift - window_right)
    if HAS_LEFT:
        hi = tl.minimum(hi, tl.minimum(n_first + BLOCK_N, len_k) - 1 - shift + window_left + 1)
    lo = (lo // BLOCK_M) * BLOCK_M

    # The query heads of this K/V head's group, in order: the sum is deterministic.
    for g in range(0, group):
        h = hk * group + g
        Q_head = Q + b64 * stride_qb + h * stride_qh
        DO_head = DO + b64 * stride_dob + h * stride_doh
        L_head = b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            m_ok = rows < len_q
            rows_q = (q_start + rows).to(tl.int64)[:, None]
            q = _load_cols(Q_head + rows_q * stride_qt, m_ok, offs_d, head_dim)
            do = _load_cols(DO_head + rows_q * stride_dot, m_ok, offs_d, head_dim)
            lse = tl.load(LSE + L_head + rows, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + L_head + rows, mask=m_ok, other=0.0)
            # lse = -inf marks a query that sees nothing: +inf makes its p exactly 0.
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
            # Transposed tiles ([keys, queries]): p^T and ds^T feed the dk, dv dots
            # directly, with no register transpose.
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            if HEAD_D1 > 0:  # k.q and v.dO reduce over the head dim: add the tail's dots
                q1 = _load_cols(Q_head + rows_q * stride_qt, m_ok, offs_t, head_dim)
                do1 = _load_cols(DO_head + rows_q * stride_dot, m_ok, offs_t, head_dim)
                s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=PRECISION)
                dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=PRECISION)
            s_t = s_t * scale_log2
            ok_t = _sees(rows[None, :], offs_n[:, None], len_q, len_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            p_t = tl.where(ok_t, tl.exp2(s_t - lse2[None, :]), 0.0)
            p_kept = p_t
            if DROPOUT:  # dv through the dropped probabilities; dp back through the mask
                keep = tl.trans(dropout_keep(SEED, b * seqlen_q + q_start + rows, h + rows * 0,
                                             n_first // 4 + tl.arange(0, BLOCK_N // 4), drop_threshold,
                                             BLOCK_M, BLOCK_N))
                p_kept = tl.where(keep, p_t * keep_scale, 0.0)
                dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
            p_kept = p_kept.to(do.dtype)
            dv += tl.dot(p_kept, do, input_precision=PRECISION)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            dk += tl.dot(ds_t, q, input_precision=PRECISION)
            if HEAD_D1 > 0:  # p^T dO and ds^T q produce head-dim columns: one accumulator per piece
                dv1 += tl.dot(p_kept, do1, input_precision=PRECISION)
                dk1 += tl.dot(ds_t, q1, input_precision=PRECISION)

    if HEAD_D1 == 0:
        dk1 = dk  # placeholders: there is no tail piece
        dv1 = dv
    if ROTARY:  # dk is wrt the rotated k: back to k's frame
        dk, dk1 = _rotate_back(dk, dk1, n_ok, k_table, COS, SIN, offs_d, offs_t, half, HEAD_D0, HEAD_D1)
    DK_rows = DK + b64 * stride_dkb + hk * stride_dkh + rows_k * stride_dkt
    DV_rows = DV + b64 * stride_dvb + hk * stride_dvh + rows_k * stride_dvt
    _store_cols(DK_rows, (dk * scale).to(DK.dtype.element_ty), n_ok, offs_d, head_dim)
    _store_cols(DV_rows, dv.to(DV.dtype.element_ty), n_ok, offs_d, head_dim)
    if HEAD_D1 > 0:
        _store_cols(DK_rows, (dk1 * scale).to(DK.dtype.element_ty), n_ok, offs_t, head_dim)
        _store_cols(DV_rows, dv1.to(DV.dtype.element_ty), n_ok, offs_t, head_dim)


@triton.jit
def _attention_bwd_dq_block(
    pid_m, Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, COS, SIN, SEED,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh, stride_cb, stride_ct,
    seqlen_q, seqlen_k, head_dim: tl.constexpr, group, scale, window_left, window_right, half,
    drop_threshold, keep_scale, tokens_q, tokens_k,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ROTARY: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D0: tl.constexpr, HEAD_D1: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    # Row strides are multiples of ROW_ALIGN (the launcher checked): whole-vector rows.
    stride_qb, stride_qt, stride_qh = _aligned3(stride_qb, stride_qt, stride_qh, ROW_ALIGN)
    stride_kb, stride_kt, stride_kh = _aligned3(stride_kb, stride_kt, stride_kh, ROW_ALIGN)
    stride_vb, stride_vt, stride_vh = _aligned3(stride_vb, stride_vt, stride_vh, ROW_ALIGN)
    stride_dob, stride_dot, stride_doh = _aligned3(stride_dob, stride_dot, stride_doh, ROW_ALIGN)
    stride_dqb, stride_dqt, stride_dqh = _aligned3(stride_dqb, stride_dqt, stride_dqh, ROW_ALIGN)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start, len_q = _segment(CU_Q, b, seqlen_q, tokens_q, VARLEN)
    k_start, len_k = _segment(CU_K, b, seqlen_k, tokens_k, VARLEN)
    m_first = pid_m * BLOCK_M
    if m_first >= len_q:
        return
    hk = h // group
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D0)  # head-dim pieces (_head_dim.py): offs_d, then the tail offs_t
    m_ok = offs_m < len_q
    b64 = b.to(tl.int64)
    rows_q = (q_start + offs_m).to(tl.int64)[:, None]
    q_table = b64 * stride_cb + rows_q * stride_ct
    Q_rows = Q + b64 * stride_qb + h * stride_qh + rows_q * stride_qt
    DO_rows = DO + b64 * stride_dob + h * stride_doh + rows_q * stride_dot
    q = _load_cols(Q_rows, m_ok, offs_d, head_dim)
    do = _load_cols(DO_rows, m_ok, offs_d, head_dim)
    dq = tl.zeros((BLOCK_M, HEAD_D0), dtype=tl.float32)
    offs_t = offs_d
    if HEAD_D1 > 0:
        offs_t = HEAD_D0 + tl.arange(0, HEAD_D1)
        q1 = _load_cols(Q_rows, m_ok, offs_t, head_dim)
        do1 = _load_cols(DO_rows, m_ok, offs_t, head_dim)
        dq1 = tl.zeros((BLOCK_M, HEAD_D1), dtype=tl.float32)
    L_at = b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    lse = tl.load(LSE + L_at, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + L_at, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    scale_log2 = scale * _LOG2E
    K_head = K + b64 * stride_kb + hk * stride_kh
    V_head = V + b64 * stride_vb + hk * stride_vh

    lo, hi = _key_range(m_first, m_first + BLOCK_M, len_q, len_k, window_left, window_right,
                        HAS_LEFT, HAS_RIGHT, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < len_k
        rows_k = (k_start + cols).to(tl.int64)[:, None]
        k = _load_cols(K_head + rows_k * stride_kt, n_ok, offs_d, head_dim)
        v = _load_cols(V_head + rows_k * stride_vt, n_ok, offs_d, head_dim)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if HEAD_D1 > 0:  # q.k and dO.v reduce over the head dim: add the tail's dots
            k1 = _load_cols(K_head + rows_k * stride_kt, n_ok, offs_t, head_dim)
            v1 = _load_cols(V_head + rows_k * stride_vt, n_ok, offs_t, head_dim)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=PRECISION)
        s = s * scale_log2
        ok = _visible(offs_m, cols, len_q, len_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        if DROPOUT:
            keep = dropout_keep(SEED, b * seqlen_q + q_start + offs_m, h + offs_m * 0,
                                start_n // 4 + tl.arange(0, BLOCK_N // 4), drop_threshold, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq += tl.dot(ds, k, input_precision=PRECISION)
        if HEAD_D1 > 0:  # ds k produces head-dim columns: one accumulator per piece
            dq1 += tl.dot(ds, k1, input_precision=PRECISION)

    if HEAD_D1 == 0:
        dq1 = dq  # a placeholder: there is no tail piece
    if ROTARY:  # dq is wrt the rotated q: back to q's frame
        dq, dq1 = _rotate_back(dq, dq1, m_ok, q_table, COS, SIN, offs_d, offs_t, half, HEAD_D0, HEAD_D1)
    DQ_rows = DQ + b64 * stride_dqb + h * stride_dqh + rows_q * stride_dqt
    _store_cols(DQ_rows, (dq * scale).to(DQ.dtype.element_ty), m_ok, offs_d, head_dim)
    if HEAD_D1 > 0:
        _store_cols(DQ_rows, (dq1 * scale).to(DQ.dtype.element_ty), m_ok, offs_t, head_dim)


# ---- main and overflow passes ----------------------------------------------------
# max_seqlen only sizes the grid of the main pass (LOOP=False: one block per program, the
# kernels as they always were). For packed inputs an overflow pass follows (LOOP=True: a
# program per segment and head runs blocks first_block, first_block + grid, ... of its
# segment), so a segment longer than max_seqlen (a caller's mistake that cannot be seen
# without a device-to-host sync) is still covered, only more slowly. Segments with
# len_q <= fit_q and len_k <= fit_k are skipped: the short-segment kernel did them
# (fit_* = -1 skips nothing).


@triton.jit
def _blocks_to_run(CU_Q, CU_K, b, seqlen_q, seqlen_k, tokens_q, tokens_k, fit_q, fit_k,
                   VARLEN: tl.constexpr, BY_KEYS: tl.constexpr, BLOCK: tl.constexpr):
    """Query (or with BY_KEYS key) blocks of segment b, 0 when it is skipped."""
    _, len_q = _segment(CU_Q, b, seqlen_q, tokens_q, VARLEN)
    _, len_k = _segment(CU_K, b, seqlen_k, tokens_k, VARLEN)
    if BY_KEYS:
        blocks = tl.cdiv(len_k, BLOCK)
    else:
        blocks = tl.cdiv(len_q, BLOCK)
    return tl.where((len_q <= fit_q) & (len_k <= fit_k), 0, blocks)


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, COS, SIN, SEED, QW,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh, stride_cb, stride_ct,
    seqlen_q, seqlen_k, head_dim: tl.constexpr, group, scale_log2, window_left, window_right, half,
    drop_threshold, keep_scale, tokens_q, tokens_k, fit_q, fit_k,
    first_block, norm_eps,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ROTARY: tl.constexpr,
    DROPOUT: tl.constexpr, QK_NORM: tl.constexpr, HAS_QW: tl.constexpr, PRECISION: tl.constexpr,
    LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D0: tl.constexpr,
    HEAD_D1: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    if LOOP:  # the overflow pass: blocks from first_block on, a stride of the grid apart
        blocks = _blocks_to_run(CU_Q, CU_K, tl.program_id(1), seqlen_q, seqlen_k, tokens_q, tokens_k,
                                fit_q, fit_k, VARLEN, False, BLOCK_M)
        for pid_m in range(first_block + tl.program_id(0), blocks, tl.num_programs(0)):
            _attention_fwd_block(
                pid_m, Q, K, V, O, LSE, CU_Q, CU_K, COS, SIN, SEED, QW,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                stride_lb, stride_lh, stride_cb, stride_ct,
                seqlen_q, seqlen_k, head_dim, group, scale_log2, window_left, window_right, half,
                drop_threshold, keep_scale, tokens_q, tokens_k, norm_eps,
                VARLEN, HAS_LEFT, HAS_RIGHT, ROTARY, DROPOUT, QK_NORM, HAS_QW, PRECISION, BLOCK_M, BLOCK_N,
                HEAD_D0, HEAD_D1, ROW_ALIGN,
            )
    else:  # the main pass: one block per program, the grid sized by max_seqlen
        _attention_fwd_block(
            tl.program_id(0), Q, K, V, O, LSE, CU_Q, CU_K, COS, SIN, SEED, QW,
            stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
            stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
            stride_lb, stride_lh, stride_cb, stride_ct,
            seqlen_q, seqlen_k, head_dim, group, scale_log2, window_left, window_right, half,
            drop_threshold, keep_scale, tokens_q, tokens_k, norm_eps,
            VARLEN, HAS_LEFT, HAS_RIGHT, ROTARY, DROPOUT, QK_NORM, HAS_QW, PRECISION, BLOCK_M, BLOCK_N,
            HEAD_D0, HEAD_D1, ROW_ALIGN,
        )


@triton.jit
def _attention_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, CU_Q, CU_K,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, head_dim, tokens_q, tokens_k, fit_q, fit_k,
    first_block,
    VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr, LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    if LOOP:  # the overflow pass: blocks from first_block on, a stride of the grid apart
        blocks = _blocks_to_run(CU_Q, CU_K, tl.program_id(1), seqlen_q, seqlen_k, tokens_q, tokens_k,
                                fit_q, fit_k, VARLEN, False, BLOCK_M)
        for pid_m in range(first_block + tl.program_id(0), blocks, tl.num_programs(0)):
            _attention_bwd_preprocess_block(
                pid_m, O, DO, DLSE, DELTA, CU_Q,
                stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, stride_lb, stride_lh,
                seqlen_q, head_dim, tokens_q,
                VARLEN, HAS_DLSE, BLOCK_M, BLOCK_D,
            )
    else:  # the main pass: one block per program, the grid sized by max_seqlen
        _attention_bwd_preprocess_block(
            tl.program_id(0), O, DO, DLSE, DELTA, CU_Q,
            stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, stride_lb, stride_lh,
            seqlen_q, head_dim, tokens_q,
            VARLEN, HAS_DLSE, BLOCK_M, BLOCK_D,
        )


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, COS, SIN, SEED,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_lb, stride_lh, stride_cb, stride_ct,
    seqlen_q, seqlen_k, head_dim: tl.constexpr, group, scale, window_left, window_right, half,
    drop_threshold, keep_scale, tokens_q, tokens_k, fit_q, fit_k,
    first_block,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ROTARY: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D0: tl.constexpr,
    HEAD_D1: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    if LOOP:  # the overflow pass: blocks from first_block on, a stride of the grid apart
        blocks = _blocks_to_run(CU_Q, CU_K, tl.program_id(1), seqlen_q, seqlen_k, tokens_q, tokens_k,
                                fit_q, fit_k, VARLEN, True, BLOCK_N)
        for pid_n in range(first_block + tl.program_id(0), blocks, tl.num_programs(0)):
            _attention_bwd_dkdv_block(
                pid_n, Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, COS, SIN, SEED,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                stride_lb, stride_lh, stride_cb, stride_ct,
                seqlen_q, seqlen_k, head_dim, group, scale, window_left, window_right, half,
                drop_threshold, keep_scale, tokens_q, tokens_k,
                VARLEN, HAS_LEFT, HAS_RIGHT, ROTARY, DROPOUT, PRECISION, BLOCK_M, BLOCK_N, HEAD_D0, HEAD_D1,
                ROW_ALIGN,
            )
    else:  # the main pass: one block per program, the grid sized by max_seqlen
        _attention_bwd_dkdv_block(
            tl.program_id(0), Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, COS, SIN, SEED,
            stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
            stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
            stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
            stride_lb, stride_lh, stride_cb, stride_ct,
            seqlen_q, seqlen_k, head_dim, group, scale, window_left, window_right, half,
            drop_threshold, keep_scale, tokens_q, tokens_k,
            VARLEN, HAS_LEFT, HAS_RIGHT, ROTARY, DROPOUT, PRECISION, BLOCK_M, BLOCK_N, HEAD_D0, HEAD_D1,
            ROW_ALIGN,
        )


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, COS, SIN, SEED,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh, stride_cb, stride_ct,
    seqlen_q, seqlen_k, head_dim: tl.constexpr, group, scale, window_left, window_right, half,
    drop_threshold, keep_scale, tokens_q, tokens_k, fit_q, fit_k,
    first_block,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ROTARY: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D0: tl.constexpr,
    HEAD_D1: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    if LOOP:  # the overflow pass: blocks from first_block on, a stride of the grid apart
        blocks = _blocks_to_run(CU_Q, CU_K, tl.program_id(1), seqlen_q, seqlen_k, tokens_q, tokens_k,
                                fit_q, fit_k, VARLEN, False, BLOCK_M)
        for pid_m in range(first_block + tl.program_id(0), blocks, tl.num_programs(0)):
            _attention_bwd_dq_block(
                pid_m, Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, COS, SIN, SEED,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                stride_dqb, stride_dqt, stride_dqh, stride_lb, stride_lh, stride_cb, stride_ct,
                seqlen_q, seqlen_k, head_dim, group, scale, window_left, window_right, half,
                drop_threshold, keep_scale, tokens_q, tokens_k,
                VARLEN, HAS_LEFT, HAS_RIGHT, ROTARY, DROPOUT, PRECISION, BLOCK_M, BLOCK_N, HEAD_D0, HEAD_D1,
                ROW_ALIGN,
            )
    else:  # the main pass: one block per program, the grid sized by max_seqlen
        _attention_bwd_dq_block(
            tl.program_id(0), Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, COS, SIN, SEED,
            stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
            stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
            stride_dqb, stride_dqt, stride_dqh, stride_lb, stride_lh, stride_cb, stride_ct,
            seqlen_q, seqlen_k, head_dim, group, scale, window_left, window_right, half,
            drop_threshold, keep_scale, tokens_q, tokens_k,
            VARLEN, HAS_LEFT, HAS_RIGHT, ROTARY, DROPOUT, PRECISION, BLOCK_M, BLOCK_N, HEAD_D0, HEAD_D1,
            ROW_ALIGN,
        )


# ---- launchers -------------------------------------------------------------------


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; a packed tensor has one implicit batch of stride 0."""
    return (0, *t.stride()[:2]) if varlen else t.stride()[:3]


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """lse is [H, T] packed (segments found through cu_seqlens) or [B, H, T] padded."""
    return (0, lse.stride(0)) if varlen else lse.stride()[:2]


def _layout(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """(varlen, batch, padded lengths, grid lengths) for the kernels. Packed grids take at
    least one block per segment, whatever max_seqlen says: the kernels loop over the rest."""
    varlen = cu_seqlens_q is not None
    if varlen:
        return varlen, cu_seqlens_q.numel() - 1, 0, 0, max(max_seqlen_q, 1), max(max_seqlen_k, 1)
    return varlen, q.shape[0], q.shape[1], k.shape[1], q.shape[1], k.shape[1]


def _blocks(device: torch.device, head_dim: int, kernel: str, masked: bool = False,
            dropout: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel "fwd", "dkdv" or "dq". Chosen
    so that none spills on sm_90a and every dot lowers to wgmma, whose tiles have at
    least 64 rows: BLOCK_N >= 64 in dkdv (its dots give [keys, .] tiles), BLOCK_M >= 64
    in the others (mmfast/compile_gate; untimed: to be measured on a GPU). ``masked``: a
    window bound (causal included); ``dropout``: the Philox mask. Both add live [M, N]
    tiles, so two specialisations get smaller or wider tiles (kernels/README.md lists
    what each costs):

    - dropout at head dims <= 64: 8 warps, not 4, in the forward (128 x 64 at 4 warps
      spilled 48 B beside the mask) and in dK/dV (64 x 64 at 4 warps: 8 B under triton 3.6);
    - dK/dV with a mask or dropout, head-dim tiles 96-128 wide: 32 query rows a step, not
      64 (64 x 64 at 8 warps spilled 48-136 B at head dim 128, 40 B at 96).

    The interpreter gets small tiles (it runs them in numpy)."""
    if device.type != "cuda":
        return 16, 16, 1, 1
    width = sum(head_dim_pieces(head_dim))
    if kernel == "fwd":
        if width <= 64:
            return 128, 64, (8 if dropout else 4), 3
        return (128, 32, 8, 2) if width <= 128 else (64, 32, 8, 1)
    if width <= 64:
        return 64, 64, (8 if dropout and kernel == "dkdv" else 4), 2
    if width <= 128:
        thin = kernel == "dkdv" and width > 80 and (masked or dropout)
        return (32 if thin else 64), 64, 8, 2
    return (32, 64, 8, 2) if kernel == "dkdv" else (64, 32, 8, 1)


def _pieces(head_dim: int, *tensors) -> dict:
    """The dot kernels' head-dim pieces and the row alignment of ``tensors`` (those they
    load and store by rows; kernels/_head_dim.py) as constexpr arguments."""
    head_d0, head_d1 = head_dim_pieces(head_dim)
    return dict(HEAD_D0=head_d0, HEAD_D1=head_d1, ROW_ALIGN=row_align(*tensors))


def _overflow_blocks(device: torch.device) -> tuple[int, int, int, int]:
    """Tiles of the overflow pass (blocks past a too-small max_seqlen, or the segments the
    short-segment kernel could not take): small, for correctness rather than speed, and
    dividing every main tile of :func:`_blocks`, so the main grid ends on one of them.
    16 x 16: at head dims 72 and 80 (two pieces, rotary) 32 x 32 tiles spilled on sm_90a
    (scripts/sm90_attention_resources.py)."""
    return (16, 16, 4, 1) if device.type == "cuda" else (16, 16, 1, 1)


def _passes(grid_len: int, main: tuple, by_keys: bool, varlen: bool, skip_up_to, device) -> list:
    """(grid dim 0, first block, LOOP, tiles, skip) of each launch over one axis: the main
    pass (one block per program, the grid sized by max_seqlen), then for packed inputs
    the overflow pass (one program per segment and head, looping over the blocks past
    the main grid: nothing to do when max_seqlen bounds the segments). With ``skip_up_to``
    (the short-segment kernel's leftovers) only an overflow pass, from block 0. ``main``:
    the main tiles; blocks are of queries (BLOCK_M) or, ``by_keys``, of keys (BLOCK_N)."""
    over = _overflow_blocks(device)
    main_block, over_block = (main[1], over[1]) if by_keys else (main[0], over[0])
    if skip_up_to is not None:
        return [(1, 0, True, over, skip_up_to)]
    grid0 = triton.cdiv(grid_len, main_block)
    passes = [(grid0, 0, False, main, (-1, -1))]
    if varlen:
        passes.append((1, grid0 * main_block // over_block, True, over, (-1, -1)))
    return passes


def _rotary_args(q, cos, sin, table_seg_stride: int | None = None) -> tuple:
    """(COS, SIN, table batch stride, table token stride, half) for the kernels; the
    tables are [T, R/2] (shared by a padded batch: batch stride 0) or [B, T, R/2], their
    last dim contiguous, sin with the strides of cos (copied so when not). The short-
    segment kernel's fallback gives its own segment stride. Without rotary: placeholders."""
    if cos is None:
        return q, q, 0, 0, 0
    if table_seg_stride is None:
        cos, sin = unit_last(cos), unit_last(sin)
        if sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
    batch_stride = 0 if cos.dim() == 2 else cos.stride(0)
    if table_seg_stride is not None:
        batch_stride = table_seg_stride
    return cos, sin, batch_stride, cos.stride(-2), cos.shape[-1]


def _rotated(x, by_keys: bool, layout: tuple, cu_q, cu_k, tokens_q: int, tokens_k: int, skip, rotary: tuple,
             norm: tuple | None = None) -> torch.Tensor:
    """x (q, or k with ``by_keys``; [T, H, D] packed, [B, T, H, D] padded) as the forward's
    fused load prepares it: RMS-normalised per head with ``norm`` = (weight or None, eps,
    rstd or None: a float32 tensor shaped like x without its last dim, given 1 / rms of
    each row), then rotated by the tables (when ``rotary`` has any: its half > 0), for the
    tokens of the segments the kernels read (others are left unwritten: no kernel reads
    them). The kernels read these copies: rotating every k tile in their inner loops
    spilled registers (scripts/sm90_attention_resources.py). ``layout``: :func:`_layout`'s;
    ``skip``: the (fit_q, fit_k) the kernels skip; ``rotary``: :func:`_rotary_args`'s."""
    varlen, batch, seqlen_q, seqlen_k, grid_q, grid_k = layout
    table_cos, table_sin, stride_cb, stride_ct, half = rotary
    weight, eps, rstd = norm if norm is not None else (None, 0.0, None)
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    BLOCK_T = 32
    if y.numel() and batch:
        grid0 = 1 if skip != (-1, -1) else triton.cdiv(grid_k if by_keys else grid_q, BLOCK_T)
        rstd_strides = (0, 0, 0) if rstd is None else _row_strides(rstd, varlen)
        _attention_rotate_kernel[(grid0, batch, x.shape[-2])](
            x, y, cu_q, cu_k, table_cos, table_sin, weight if weight is not None else x,
            rstd if rstd is not None else x,
            *_strides(x, varlen), *_strides(y, varlen), stride_cb, stride_ct, *rstd_strides,
            seqlen_q, seqlen_k, tokens_q, tokens_k, *skip, x.shape[-1], half, eps,
            VARLEN=varlen, BY_KEYS=by_keys, ROTARY=half > 0, NORM=norm is not None, HAS_W=weight is not None,
            STORE_RSTD=rstd is not None, BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(x.shape[-1]),
            num_warps=8,  # 4 spilled at head dim 72 (BLOCK_D 128) on sm_90a
        )
    return y


def _row_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a per-row tensor ([T, H] packed, [B, T, H] padded)."""
    return (0, *t.stride()) if varlen else t.stride()


def _qk_norm_args(qk_norm, into, skip_up_to) -> tuple:
    """(q weight, k weight, eps) with the weights made contiguous (the kernels read them as
    flat [D] arrays), or (None, None, None) without qk_norm. Not with ``into`` /
    ``skip_up_to`` (the short-segment backend's hand-over): the norm's backward makes new
    gradients, and skipped rows would have no 1/rms."""
    if qk_norm is None:
        return None, None, None
    if into is not None or skip_up_to is not None:
        raise ValueError("qk_norm: not taken together with into / skip_up_to (the short-segment backend composes "
                         "the norm instead)")
    q_weight, k_weight, eps = qk_norm
    return dense(q_weight), dense(k_weight), float(eps)


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    """(drop threshold on 31-bit random integers, 1 / (1 - p)) for the kernels."""
    return int(dropout_p * 2**31), 1.0 / (1.0 - dropout_p)


def _precision(dtype: torch.dtype) -> str:
    # IEEE float32 dots for float32 inputs: TF32 would be less accurate than the reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                  window_left: int, window_right: int, scale: float, cos=None, sin=None,
                  seed=None, dropout_p: float = 0.0, skip_up_to: tuple[int, int] | None = None,
                  into: tuple | None = None, table_seg_stride: int | None = None, qk_norm: tuple | None = None):
    """Launch the forward kernel. Returns (out, lse): out like q (contiguous), lse float32
    [Hq, Tq] packed or [B, Hq, Tq] padded. q, k, v get a contiguous last dim if they lack one.

    Packed: cu_seqlens_* are int32 [B+1]; max_seqlen_* should bound every segment's length
    (they size the grid; nothing is read back to the host): a longer segment is still
    computed, by a second launch that loops over the blocks past the grid. cu_seqlens
    values are clamped into [0, T] on the device, so no value reaches outside the tensors
    (bad ones give unspecified rows, not corruption).
    ``skip_up_to`` = (lq, lk): skip segments with at most lq queries and lk keys (done by
    the short-segment kernel), writing into its (out, lse) given as ``into``, its tables
    read with ``table_seg_stride``. Padded: cu_seqlens_* are None.
    ``cos``, ``sin`` (or None): rotary tables, applied to q and k as they are loaded; q and
    k then have the same tokens, and table row t rotates token t of both.
    ``seed`` (int64 [2] on the device) and ``dropout_p`` > 0: attention-probability
    dropout (kernels/attention_dropout.py); out is the dropped output, lse is unaffected.
    ``qk_norm`` = (q weight or None, k weight or None, eps): q and k RMS-normalised per
    head (over D, times the weight) before the rotation, q tiles as they are loaded, k by
    the pass that rotates it.
    """
    layout = _layout(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    varlen, batch, seqlen_q, seqlen_k, grid_q, _ = layout
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    cu_seqlens_q, cu_seqlens_k = dense(cu_seqlens_q), dense(cu_seqlens_k)
    heads, head_dim = q.shape[-2], q.shape[-1]
    tokens = q.shape[-3]
    lse_shape = (heads, tokens) if varlen else (batch, heads, tokens)
    if into is None:
        out = empty(q.shape, dtype=q.dtype, device=q.device)
        lse = empty(lse_shape, dtype=torch.float32, device=q.device)
    else:
        out, lse = into
    if batch == 0 or grid_q == 0 or heads == 0 or q.numel() == 0:
        return out, lse
    main = _blocks(q.device, head_dim, "fwd", dropout=dropout_p > 0)
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    rotary = _rotary_args(q, cos, sin, table_seg_stride)
    table_cos, table_sin, stride_cb, stride_ct, half = rotary
    q_weight, k_weight, norm_eps = _qk_norm_args(qk_norm, into, skip_up_to)
    skip_rot = skip_up_to if skip_up_to is not None else (-1, -1)
    q_on_load = qk_norm is None or head_dim_pieces(head_dim)[1] == 0
    if cos is not None or qk_norm is not None:  # q tiles are prepared on load; k is read prepared
        k = _rotated(k, True, layout, cu_q, cu_k, q.shape[-3], k.shape[-3], skip_rot, rotary,
                     None if qk_norm is None else (k_weight, norm_eps, None))
    if not q_on_load:
        # Head dims in two pieces (72, 80): normalising q on load spilled on sm_90a (96 B at
        # 128 x 32 tiles), so the pass that prepares k prepares q too, and the kernel reads it.
        q = _rotated(q, False, layout, cu_q, cu_k, q.shape[-3], k.shape[-3], skip_rot, rotary,
                     (q_weight, norm_eps, None))
        cos, qk_norm = None, None
    pieces = _pieces(head_dim, q, k, v, out)
    for grid0, first, loop, (BLOCK_M, BLOCK_N, num_warps, num_stages), skip in _passes(
            grid_q, main, False, varlen, skip_up_to, q.device):
        _attention_fwd_kernel[(grid0, batch, heads)](
            q, k, v, out, lse, cu_q, cu_k, table_cos, table_sin, seed if seed is not None else cu_q,
            q_weight if q_weight is not None else q,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
            *_lse_strides(lse, varlen), stride_cb, stride_ct,
            seqlen_q, seqlen_k, head_dim, heads // k.shape[-2], scale * LOG2E, window_left, window_right, half,
            *_dropout_args(dropout_p), q.shape[-3], k.shape[-3], *skip, first,
            norm_eps if norm_eps is not None else 0.0,
            VARLEN=varlen, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, ROTARY=cos is not None,
            DROPOUT=dropout_p > 0, QK_NORM=qk_norm is not None, HAS_QW=qk_norm is not None and q_weight is not None,
            PRECISION=_precision(q.dtype),
            LOOP=loop, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **pieces,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out, lse


def attention_bwd(do, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                  max_seqlen_q: int, max_seqlen_k: int, window_left: int, window_right: int,
                  scale: float, cos=None, sin=None, seed=None, dropout_p: float = 0.0,
                  skip_up_to: tuple[int, int] | None = None, into: tuple | None = None,
                  table_seg_stride: int | None = None, qk_norm: tuple | None = None):
    """Launch the backward kernels. Returns (dq, dk, dv) in the dtypes and shapes of q, k, v;
    with ``qk_norm`` (as in :func:`attention_fwd`), (dq, dk, dv, dq_weight, dk_weight), the
    weight gradients float32 [D] (empty for a weight that is None).

    ``dlse`` is the gradient of lse, or None. Three launches: delta = rowsum(dO * O) - dLSE,
    then dK/dV (over query blocks) and dQ (over key blocks); no atomics. With rotary tables
    (as in :func:`attention_fwd`), dq and dk are the gradients wrt the unrotated q and k:
    two more launches first write rotated copies of q and k, which the kernels read.
    With ``seed`` and ``dropout_p`` (those of the forward) the kernels regenerate its mask.
    cu_seqlens, max_seqlen, ``skip_up_to``, ``table_seg_stride`` as in
    :func:`attention_fwd`; ``into``: (dq, dk, dv) to write into.
    With ``qk_norm`` the copies are normalised before they are rotated (their 1 / rms kept),
    the kernels give the gradients wrt the normalised q and k, and the RMSNorm backward
    (kernels/norm.py) maps them to the raw q, k and the weights.
    """
    layout = _layout(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    varlen, batch, seqlen_q, seqlen_k, grid_q, grid_k = layout
    do, q, k, v, out = (unit_last(t) for t in (do, q, k, v, out))
    lse, dlse, cu_seqlens_q, cu_seqlens_k = dense(lse), dense(dlse), dense(cu_seqlens_q), dense(cu_seqlens_k)
    heads, kv_heads, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    if into is None:
        dq = empty(q.shape, dtype=q.dtype, device=q.device)
        dk = empty(k.shape, dtype=k.dtype, device=k.device)
        dv = empty(v.shape, dtype=v.dtype, device=v.device)
    else:
        dq, dk, dv = into
    if batch == 0 or heads == 0 or q.numel() == 0 or k.numel() == 0:
        # Nothing attends: every gradient is zero (and must be written).
        zeros = (dq.zero_(), dk.zero_(), dv.zero_())
        if qk_norm is None:
            return zeros
        return zeros + tuple(torch.zeros(w.shape if w is not None else (0,), dtype=torch.float32, device=q.device)
                             for w in qk_norm[:2])
    delta = empty(lse.shape, dtype=torch.float32, device=q.device)
    BLOCK_D = triton.next_power_of_2(head_dim)
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    lse_strides = _lse_strides(lse, varlen)
    rotary = _rotary_args(q, cos, sin, table_seg_stride)
    table_cos, table_sin, stride_cb, stride_ct, half = rotary
    raw_q, raw_k = q, k
    q_weight, k_weight, norm_eps = _qk_norm_args(qk_norm, into, skip_up_to)
    if qk_norm is not None:
        # 1 / rms of each row of q and k, for the norm backward; rows of no segment keep 0
        # (no gradient reaches them through the norm).
        rstd_q = torch.zeros(q.shape[:-1], dtype=torch.float32, device=q.device)
        rstd_k = torch.zeros(k.shape[:-1], dtype=torch.float32, device=k.device)
    if cos is not None or qk_norm is not None:
        # The kernels read prepared copies and rotate dq, dk back (see _rotated).
        skip_rot = skip_up_to if skip_up_to is not None else (-1, -1)
        tokens_q, tokens_k = q.shape[-3], k.shape[-3]
        q = _rotated(q, False, layout, cu_q, cu_k, tokens_q, tokens_k, skip_rot, rotary,
                     None if qk_norm is None else (q_weight, norm_eps, rstd_q))
        k = _rotated(k, True, layout, cu_q, cu_k, tokens_q, tokens_k, skip_rot, rotary,
                     None if qk_norm is None else (k_weight, norm_eps, rstd_k))
    flags = dict(VARLEN=varlen, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
                 ROTARY=cos is not None, DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype),
                 **_pieces(head_dim, q, k, v, do, dq, dk, dv))
    sizes = (stride_cb, stride_ct, seqlen_q, seqlen_k, head_dim, heads // kv_heads, scale,
             window_left, window_right, half, *_dropout_args(dropout_p), q.shape[-3], k.shape[-3])
    seed = seed if seed is not None else cu_q
    masked, dropout = window_left >= 0 or window_right >= 0, dropout_p > 0
    query_passes = _passes(grid_q, _blocks(q.device, head_dim, "dq", masked, dropout), False, varlen, skip_up_to,
                           q.device)
    for grid0, first, loop, (BLOCK_M, _, num_warps, num_stages), skip in query_passes:
        _attention_bwd_preprocess_kernel[(grid0, batch, heads)](
            out, do, dlse if dlse is not None else lse, delta, cu_q, cu_k,
            *_strides(out, varlen), *_strides(do, varlen), *lse_strides,
            seqlen_q, seqlen_k, head_dim, q.shape[-3], k.shape[-3], *skip, first,
            VARLEN=varlen, HAS_DLSE=dlse is not None, LOOP=loop, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
        )
    for grid0, first, loop, (BLOCK_M, BLOCK_N, num_warps, num_stages), skip in _passes(
            grid_k, _blocks(q.device, head_dim, "dkdv", masked, dropout), True, varlen, skip_up_to, q.device):
        _attention_bwd_dkdv_kernel[(grid0, batch, kv_heads)](
            q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, table_cos, table_sin, seed,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
            *_strides(dk, varlen), *_strides(dv, varlen), *lse_strides,
            *sizes, *skip, first, **flags, LOOP=loop, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            num_warps=num_warps, num_stages=num_stages,
        )
    for grid0, first, loop, (BLOCK_M, BLOCK_N, num_warps, num_stages), skip in query_passes:
        _attention_bwd_dq_kernel[(grid0, batch, heads)](
            q, k, v, do, lse, delta, dq, cu_q, cu_k, table_cos, table_sin, seed,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
            *_strides(dq, varlen), *lse_strides,
            *sizes, *skip, first, **flags, LOOP=loop, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            num_warps=num_warps, num_stages=num_stages,
        )
    if qk_norm is None:
        return dq, dk, dv
    # dq, dk are wrt the normalised q, k: through the RMSNorm backward to the raw ones.
    dq, dq_weight, _ = norm_bwd(dq, raw_q, q_weight, False, None, rstd_q, None, True)
    dk, dk_weight, _ = norm_bwd(dk, raw_k, k_weight, False, None, rstd_k, None, True)
    return dq, dk, dv, dq_weight, dk_weight
