"""Triton kernels for patch embedding as an implicit GEMM: pixels are read where they
lie (no unfold/im2col copy), and the epilogue adds bias, position embedding and the class
token before the one store.

Two ways to read the A operand (``IMAGE``, a compile-time constant):

    IMAGE=True   pixels [B, C, H, W] (any strides), patch size P, Gw = W / P patches per
                 row, L = (H / P) * Gw patches per image. Output row t of image b is
                 the class token when HAS_CLS and t = 0, else patch l = t - HAS_CLS at
                 (l // Gw, l % Gw); its A row is the C*P*P pixels of that patch in
                 (c, i, j) order, the order of a Conv2d weight [E, C, P, P] flattened.
    IMAGE=False  rows [M, K] already patchified (Qwen2-VL's Conv3d input); A = rows.

    out[row, n] = sum_k A[row, k] * W[n, k] + bias[n] + pos[t, n] (+ cls[n] at t = 0)

Backward:
    dA[row, k] = sum_n dout[row, n] * W[n, k]    scattered back to the pixels (each pixel
                                                 belongs to exactly one patch: no atomics)
    dW[n, k]   = sum_row dout[row, n] * A[row, k]  (split over rows into a few partial
                                                 sums, added by the launcher: deterministic)
Bias, position and class gradients are sums of dout over the batch, done by the op.

Accumulation is float32; float32 inputs multiply in IEEE float32 (no TF32).
"""

import os

import torch
import triton
import triton.language as tl

from ._launch import dense, empty, multiprocessor_count, unit_last
from ._tuning import autotune

# 8 warps for the 64-wide K tiles: with 4 they spill on sm_90a (up to 1.4 KB per thread;
# the compile gate, mmfast/compile_gate).
_ALL_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
]
# The input gradient's output tile is BLOCK_M x BLOCK_K, scattered back to the pixels
# through int64 addresses: at 128 x 64 that spills even with 8 warps, so it skips that one.
_ALL_BWD_INPUT_CONFIGS = [c for c in _ALL_CONFIGS if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) != (128, 64)]
# The interpreter has no device to time configs on: it runs the first one.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_CONFIGS = _ALL_CONFIGS[:1] if _INTERPRET else _ALL_CONFIGS
_BWD_INPUT_CONFIGS = _ALL_BWD_INPUT_CONFIGS[:1] if _INTERPRET else _ALL_BWD_INPUT_CONFIGS


@triton.jit
def _row_offsets(rows, L, GRID_W, P: tl.constexpr, stride_xb, stride_xh, stride_xw,
                 HAS_CLS: tl.constexpr, IMAGE: tl.constexpr):
    """Where each output row's A row starts (int64), and whether it is a patch row."""
    if IMAGE:
        patch = rows % (L + HAS_CLS) - HAS_CLS
        is_patch = patch >= 0
        patch = tl.where(is_patch, patch, 0)
        offset = (rows // (L + HAS_CLS)) * stride_xb \
            + (patch // GRID_W) * P * stride_xh + (patch % GRID_W) * P * stride_xw
    else:
        is_patch = rows >= 0
        offset = rows * stride_xb
    return offset, is_patch


@triton.jit
def _k_offsets(ks, P: tl.constexpr, stride_xc, stride_xh, stride_xw, IMAGE: tl.constexpr):
    """Offset of element k of an A row from the row's start: (c, i, j) of a patch."""
    if IMAGE:
        ij = ks % (P * P)
        return (ks // (P * P)) * stride_xc + (ij // P) * stride_xh + (ij % P) * stride_xw
    else:
        return ks


@triton.jit
def _out_rows(patches, L, HAS_CLS: tl.constexpr, IMAGE: tl.constexpr):
    """Output row of patch number p (0 .. B*L): p, shifted past each image's class row."""
    if IMAGE:
        return patches + (patches // L + 1) * HAS_CLS
    else:
        return patches


@autotune(_CONFIGS, key=["N", "K", "IMAGE"])
@triton.jit
def _patch_embed_fwd_kernel(
    X, W, BIAS, POS, CLS, OUT,
    M, N, K, L, GRID_W,
    stride_xb, stride_xc, stride_xh, stride_xw, stride_wn, stride_pos, stride_out,
    P: tl.constexpr, IMAGE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_CLS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    row_off, is_patch = _row_offsets(rows, L, GRID_W, P, stride_xb, stride_xh, stride_xw, HAS_CLS, IMAGE)
    a_row_ok = row_ok & is_patch

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        k_off = _k_offsets(ks, P, stride_xc, stride_xh, stride_xw, IMAGE)
        a = tl.load(X + row_off[:, None] + k_off[None, :], mask=a_row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)

    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where(a_row_ok[:, None], bias[None, :], 0.0)
    if HAS_POS:
        t = rows % (L + HAS_CLS)
        acc += tl.load(POS + t[:, None] * stride_pos + cols[None, :],
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_CLS:
        cls = tl.load(CLS + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where(is_patch[:, None], 0.0, cls[None, :])
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@autotune(_BWD_INPUT_CONFIGS, key=["N", "K", "IMAGE"])
@triton.jit
def _patch_embed_bwd_input_kernel(
    DOUT, W, DX,
    M, N, K, L, GRID_W,
    stride_xb, stride_xc, stride_xh, stride_xw, stride_wn, stride_dout,
    P: tl.constexpr, IMAGE: tl.constexpr, HAS_CLS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Programs walk the M = B * L patch rows only; class-token rows have no pixels.
    patches = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    patch_ok = patches < M
    k_ok = ks < K
    out_rows = _out_rows(patches, L, HAS_CLS, IMAGE)
    row_off, _ = _row_offsets(out_rows, L, GRID_W, P, stride_xb, stride_xh, stride_xw, HAS_CLS, IMAGE)
    k_off = _k_offsets(ks, P, stride_xc, stride_xh, stride_xw, IMAGE)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        dout = tl.load(DOUT + out_rows[:, None] * stride_dout + ns[None, :],
                       mask=patch_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(W + ns[:, None] * stride_wn + ks[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(dout, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(dout, w, acc)
    tl.store(DX + row_off[:, None] + k_off[None, :], acc.to(DX.dtype.element_ty),
             mask=patch_ok[:, None] & k_ok[None, :])


@autotune(_CONFIGS, key=["N", "K", "IMAGE"])
@triton.jit
def _patch_embed_bwd_weight_kernel(
    DOUT, X, DW_PARTIAL,
    M, N, K, L, GRID_W,
    stride_xb, stride_xc, stride_xh, stride_xw, rows_per_split, stride_dout,
    P: tl.constexpr, IMAGE: tl.constexpr, HAS_CLS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    n_ok = ns < N
    k_ok = ks < K
    start = split.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    k_off = _k_offsets(ks, P, stride_xc, stride_xh, stride_xw, IMAGE)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        patches = m0 + tl.arange(0, BLOCK_M)
        patch_ok = patches < end
        out_rows = _out_rows(patches, L, HAS_CLS, IMAGE)
        row_off, _ = _row_offsets(out_rows, L, GRID_W, P, stride_xb, stride_xh, stride_xw, HAS_CLS, IMAGE)
        a = tl.load(X + row_off[:, None] + k_off[None, :], mask=patch_ok[:, None] & k_ok[None, :], other=0.0)
        dout = tl.load(DOUT + out_rows[:, None] * stride_dout + ns[None, :],
                       mask=patch_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(tl.trans(dout), a, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(dout), a, acc)
    tl.store(DW_PARTIAL + split * N * K + ns[:, None] * K + ks[None, :], acc,
             mask=n_ok[:, None] & k_ok[None, :])


class Geometry:
    """How rows of the GEMM map onto the input: image (pixels) or patchified rows."""

    def __init__(self, x: torch.Tensor, patch: int, has_cls: bool):
        self.image = x.dim() == 4
        self.has_cls = int(has_cls)
        if self.image:
            B, C, H, W = x.shape
            self.grid_w = W // patch
            self.L = (H // patch) * self.grid_w
            self.patches = B * self.L
            self.rows = B * (self.L + self.has_cls)
            self.K = C * patch * patch
            self.strides = tuple(x.stride())
        else:
            self.grid_w, self.L = 1, x.shape[0]
            self.patches = self.rows = x.shape[0]
            self.K = x.shape[1]
            self.strides = (x.stride(0), 0, 0, 0)
        self.patch = patch

    def common(self):
        """The runtime geometry arguments of the kernels (the patch size is a constexpr:
        divisions by it compile to multiplications)."""
        return (self.L, self.grid_w, *self.strides)


def patch_embed_fwd(x, weight2, bias, pos, cls, patch: int):
    """Launch the forward kernel. ``x`` pixels [B, C, H, W] (H, W multiples of ``patch``) or
    rows [M, K]; ``weight2`` [E, K] with unit stride along K; ``pos`` [L (+1), E] with unit
    stride along E or None; ``cls`` [E] or None. Returns [B, L (+1), E] or [M, E].
    Arguments without the unit strides the kernel assumes are made so first."""
    x = x if x.dim() == 4 else unit_last(x)  # pixels go through all their strides
    weight2, pos, bias, cls = unit_last(weight2), unit_last(pos), dense(bias), dense(cls)
    geo = Geometry(x, patch, cls is not None)
    E = weight2.shape[0]
    shape = (x.shape[0], geo.L + geo.has_cls, E) if geo.image else (geo.rows, E)
    out = empty(shape, dtype=x.dtype, device=x.device)
    if geo.rows == 0 or E == 0:
        return out
    grid = lambda meta: (triton.cdiv(geo.rows, meta["BLOCK_M"]), triton.cdiv(E, meta["BLOCK_N"]))
    _patch_embed_fwd_kernel[grid](
        x, weight2, bias if bias is not None else weight2, pos if pos is not None else weight2,
        cls if cls is not None else weight2, out,
        geo.rows, E, geo.K, *geo.common(), weight2.stride(0),
        pos.stride(0) if pos is not None else 0, E,
        P=geo.patch, IMAGE=geo.image, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
        HAS_CLS=geo.has_cls, IEEE=x.dtype == torch.float32,
    )
    return out


def patch_embed_bwd(dout, x, weight2, patch: int, has_cls: bool, need_input: bool, need_weight: bool):
    """Launch the backward kernels: (d x shaped like a contiguous ``x``, d weight [E, K]
    float32); each is None when not needed. ``dout`` is made contiguous if it is not."""
    x = x if x.dim() == 4 else unit_last(x)
    dout, weight2 = dense(dout), unit_last(weight2)
    geo = Geometry(x, patch, has_cls)
    E, K = weight2.shape
    dx = dw = None
    if need_input:
        dx = empty(x.shape, dtype=x.dtype, device=x.device)
        dx_geo = Geometry(dx, patch, has_cls)  # dx is contiguous, whatever the strides of x
        if E == 0:
            dx.zero_()
        elif geo.patches and K:
            grid = lambda meta: (triton.cdiv(geo.patches, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))
            _patch_embed_bwd_input_kernel[grid](
                dout, weight2, dx, geo.patches, E, K, *dx_geo.common(), weight2.stride(0), E,
                P=geo.patch, IMAGE=geo.image, HAS_CLS=geo.has_cls, IEEE=x.dtype == torch.float32,
            )
    if need_weight:
        # Enough row splits to fill the device about twice over with the largest tiles
        # (which also bounds the float32 partials at ~2 SMs x 128 x 128 x 4 bytes).
        tiles = triton.cdiv(E, 128) * triton.cdiv(K, 128)
        split = max(1, min(64, (2 * multiprocessor_count(x.device)) // max(1, tiles), triton.cdiv(geo.patches, 256)))
        rows_per_split = triton.cdiv(geo.patches, split) if geo.patches else 0
        partial = torch.zeros((split, E, K), dtype=torch.float32, device=x.device)
        if geo.patches and E and K:
            grid = lambda meta: (triton.cdiv(E, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]), split)
            _patch_embed_bwd_weight_kernel[grid](
                dout, x, partial, geo.patches, E, K, *geo.common(), rows_per_split, E,
                P=geo.patch, IMAGE=geo.image, HAS_CLS=geo.has_cls, IEEE=x.dtype == torch.float32,
            )
        dw = partial.sum(0)
    return dx, dw
