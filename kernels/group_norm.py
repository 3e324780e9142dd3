"""Triton kernels for GroupNorm, optionally followed by SiLU, split over the spatial extent.

Shapes: X, Y, DY, DX are viewed as [B, C, S] through strides, so one kernel serves NCHW
(stride_s = 1) and channels_last / NHWC (stride_c = 1, stride_s = C). Channels c of group
g are g * Cg .. g * Cg + Cg - 1, Cg = C / G. W, B are [C]. Statistics are float32.

One (batch, group) is split over SPLITS programs, each owning a run of spatial tiles, so
that batch 2 with 32 groups still fills every SM. Two launches per pass, no atomics:

Forward
  1. stats:  each program reduces its run to (mean, M2) of its Cg x run elements (tiles
             combined with Chan's formula, stable for large means) -> PART_MEAN, PART_M2
             [B * G, SPLITS];
  2. apply:  each program combines the SPLITS partials of its group (a few dozen numbers)
             into mean, rstd, then writes over its run
                 z = (x - mean) * rstd * w + b,   y = z  or  z * sigmoid(z)  (SiLU)
             and the split-0 program stores MEAN, RSTD [B * G] for the backward.
  x is read twice; at the UNet's sizes (a few MB a tensor at batch 2) the second read
  comes mostly from L2 (50 MB on an H100). Unmeasured so far.

Backward (z recomputed from x; with SiLU, dz = dy * s * (1 + z * (1 - s)), s = sigmoid(z))
  1. reduce: per program, the group sums  A = sum(dz * w),  Bx = sum(dz * w * xhat)
             -> PART_A, PART_B [B * G, SPLITS], and per channel  sum(dz * xhat), sum(dz)
             over its run -> DW_PART, DB_PART [B, SPLITS, C] (summed by the launcher:
             deterministic);
  2. dx:     dx = rstd * (dz * w - A / N - xhat * Bx / N),  N = Cg * S.
"""

import math

import torch
import triton
import triton.language as tl

from ._launch import POISON_OUTPUTS, dense, multiprocessor_count

# Elements of one register tile (channels of a group x spatial positions).
TILE_ELEMENTS = 2048
# Channels of a group handled per tile; larger groups loop over channel blocks.
MAX_BLOCK_C = 64


@triton.jit
def _tile(stride_c, stride_s, c0, s0, Cg, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets and mask of the [BLOCK_C, BLOCK_S] tile at channel c0, position s0."""
    cs = c0 + tl.arange(0, BLOCK_C)
    ss = s0 + tl.arange(0, BLOCK_S)
    mask = (cs < Cg)[:, None] & (ss < S)[None, :]
    offsets = cs.to(tl.int64)[:, None] * stride_c + ss.to(tl.int64)[None, :] * stride_s
    return cs, offsets, mask


@triton.jit
def _group_norm_stats_kernel(
    X, PART_MEAN, PART_M2,
    stride_xb, stride_xc, stride_xs,
    G, Cg, S, tiles_per_split,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bg // G
    g = bg % G
    base = X + b.to(tl.int64) * stride_xb + (g * Cg).to(tl.int64) * stride_xc
    s_begin = split * tiles_per_split * BLOCK_S
    s_end = tl.minimum(s_begin + tiles_per_split * BLOCK_S, S)

    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, Cg, BLOCK_C):
        for s0 in range(s_begin, s_end, BLOCK_S):
            cs, offsets, mask = _tile(stride_xc, stride_xs, c0, s0, Cg, s_end, BLOCK_C, BLOCK_S)
            x = tl.load(base + offsets, mask=mask, other=0.0).to(tl.float32)
            n = tl.sum(mask.to(tl.float32))
            tile_mean = tl.sum(x) / n
            tile_m2 = tl.sum(tl.where(mask, (x - tile_mean) * (x - tile_mean), 0.0))
            total = count + n
            delta = tile_mean - mean
            mean += delta * (n / total)
            m2 += tile_m2 + delta * delta * (count * n / total)
            count = total
    tl.store(PART_MEAN + bg * splits + split, mean)
    tl.store(PART_M2 + bg * splits + split, m2)


@triton.jit
def _group_stats(PART_MEAN, PART_M2, bg, splits, tiles_per_split, Cg, S, total, eps,
                 BLOCK_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Mean and rstd of group bg from its per-split partials (Chan's parallel formula)."""
    i = tl.arange(0, BLOCK_SPLITS)
    ok = i < splits
    part_mean = tl.load(PART_MEAN + bg * splits + i, mask=ok, other=0.0)
    part_m2 = tl.load(PART_M2 + bg * splits + i, mask=ok, other=0.0)
    run = tiles_per_split * BLOCK_S
    part_n = tl.where(ok, (tl.minimum((i + 1) * run, S) - i * run).to(tl.float32) * Cg, 0.0)
    mean = tl.sum(part_n * part_mean) / total
    delta = part_mean - mean
    m2 = tl.sum(part_m2 + part_n * delta * delta)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)
    return mean, rstd


@triton.jit
def _group_norm_apply_kernel(
    X, W, B, Y, PART_MEAN, PART_M2, MEAN, RSTD,
    stride_xb, stride_xc, stride_xs, stride_yb, stride_yc, stride_ys,
    G, Cg, S, total, tiles_per_split, eps,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bg // G
    g = bg % G
    mean, rstd = _group_stats(PART_MEAN, PART_M2, bg, splits, tiles_per_split, Cg, S, total, eps,
                              BLOCK_SPLITS, BLOCK_S)
    if split == 0:
        tl.store(MEAN + bg, mean)
        tl.store(RSTD + bg, rstd)

    x_base = X + b.to(tl.int64) * stride_xb + (g * Cg).to(tl.int64) * stride_xc
    y_base = Y + b.to(tl.int64) * stride_yb + (g * Cg).to(tl.int64) * stride_yc
    s_begin = split * tiles_per_split * BLOCK_S
    s_end = tl.minimum(s_begin + tiles_per_split * BLOCK_S, S)
    for c0 in range(0, Cg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < Cg
        # Fold the normalisation into one multiply-add per element.
        a = tl.load(W + g * Cg + cs, mask=c_ok, other=0.0).to(tl.float32) * rstd
        shift = tl.load(B + g * Cg + cs, mask=c_ok, other=0.0).to(tl.float32) - mean * a
        for s0 in range(s_begin, s_end, BLOCK_S):
            _, x_off, mask = _tile(stride_xc, stride_xs, c0, s0, Cg, s_end, BLOCK_C, BLOCK_S)
            _, y_off, _ = _tile(stride_yc, stride_ys, c0, s0, Cg, s_end, BLOCK_C, BLOCK_S)
            x = tl.load(x_base + x_off, mask=mask, other=0.0).to(tl.float32)
            z = x * a[:, None] + shift[:, None]
            if SILU:
                z = z * tl.sigmoid(z)
            tl.store(y_base + y_off, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _dz(x, dy, w, b, mean, rstd, SILU: tl.constexpr):
    """xhat and the gradient at the pre-activation z = xhat * w + b."""
    xhat = (x - mean) * rstd
    if SILU:
        z = xhat * w[:, None] + b[:, None]
        s = tl.sigmoid(z)
        dz = dy * s * (1.0 + z * (1.0 - s))
    else:
        dz = dy
    return xhat, dz


@triton.jit
def _group_norm_bwd_reduce_kernel(
    X, DY, W, B, MEAN, RSTD, PART_A, PART_B, DW_PART, DB_PART,
    stride_xb, stride_xc, stride_xs, stride_dyb, stride_dyc, stride_dys,
    G, C, Cg, S, tiles_per_split,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bg // G
    g = bg % G
    mean = tl.load(MEAN + bg)
    rstd = tl.load(RSTD + bg)
    x_base = X + b.to(tl.int64) * stride_xb + (g * Cg).to(tl.int64) * stride_xc
    dy_base = DY + b.to(tl.int64) * stride_dyb + (g * Cg).to(tl.int64) * stride_dyc
    s_begin = split * tiles_per_split * BLOCK_S
    s_end = tl.minimum(s_begin + tiles_per_split * BLOCK_S, S)

    sum_a = 0.0
    sum_b = 0.0
    for c0 in range(0, Cg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < Cg
        w = tl.load(W + g * Cg + cs, mask=c_ok, other=0.0).to(tl.float32)
        bias = tl.load(B + g * Cg + cs, mask=c_ok, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
        db = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for s0 in range(s_begin, s_end, BLOCK_S):
            _, x_off, mask = _tile(stride_xc, stride_xs, c0, s0, Cg, s_end, BLOCK_C, BLOCK_S)
            _, dy_off, _ = _tile(stride_dyc, stride_dys, c0, s0, Cg, s_end, BLOCK_C, BLOCK_S)
            x = tl.load(x_base + x_off, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_base + dy_off, mask=mask, other=0.0).to(tl.float32)
            xhat, dz = _dz(x, dy, w, bias, mean, rstd, SILU)
            xhat = tl.where(mask, xhat, 0.0)
            dz = tl.where(mask, dz, 0.0)
            dw += tl.sum(dz * xhat, axis=1)
            db += tl.sum(dz, axis=1)
        sum_a += tl.sum(db * w)
        sum_b += tl.sum(dw * w)
        row = (b * splits + split).to(tl.int64) * C + g * Cg
        tl.store(DW_PART + row + cs, dw, mask=c_ok)
        tl.store(DB_PART + row + cs, db, mask=c_ok)
    tl.store(PART_A + bg * splits + split, sum_a)
    tl.store(PART_B + bg * splits + split, sum_b)


@triton.jit
def _group_norm_bwd_dx_kernel(
    X, DY, W, B, MEAN, RSTD, PART_A, PART_B, DX,
    stride_xb, stride_xc, stride_xs, stride_dyb, stride_dyc, stride_dys,
    stride_dxb, stride_dxc, stride_dxs,
    G, Cg, S, total, tiles_per_split,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bg // G
    g = bg % G
    mean = tl.load(MEAN + bg)
    rstd = tl.load(RSTD + bg)
    i = tl.arange(0, BLOCK_SPLITS)
    mean_a = tl.sum(tl.load(PART_A + bg * splits + i, mask=i < splits, other=0.0)) / total
    mean_b = tl.sum(tl.load(PART_B + bg * splits + i, mask=i < splits, other=0.0)) / total

    x_base = X + b.to(tl.int64) * stride_xb + (g * Cg).to(tl.int64) * stride_xc
    dy_base = DY + b.to(tl.int64) * stride_dyb + (g * Cg).to(tl.int64) * stride_dyc
    dx_base = DX + b.to(tl.int64) * stride_dxb + (g * Cg).to(tl.int64) * stride_dxc
    s_begin = split * tiles_per_split * BLOCK_S
    s_end = tl.minimum(s_begin + tiles_per_split * BLOCK_S, S)
    for c0 in range(0, Cg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < Cg
        w = tl.load(W + g * Cg + cs, mask=c_ok, other=0.0).to(tl.float32)
        bias = tl.load(B + g * Cg + cs, mask=c_ok, other=0.0).to(tl.float32)
        for s0 in range(s_begin, s_end, BLOCK_S):
            _, x_off, mask = _tile(stride_xc, stride_xs, c0, s0, Cg, s_end, BLOCK_C, BLOCK_S)
            _, dy_off, _ = _tile(stride_dyc, stride_dys, c0, s0, Cg, s_end, BLOCK_C, BLOCK_S)
            _, dx_off, _ = _tile(stride_dxc, stride_dxs, c0, s0, Cg, s_end, BLOCK_C, BLOCK_S)
            x = tl.load(x_base + x_off, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_base + dy_off, mask=mask, other=0.0).to(tl.float32)
            xhat, dz = _dz(x, dy, w, bias, mean, rstd, SILU)
            dx = rstd * (dz * w[:, None] - mean_a - xhat * mean_b)
            tl.store(dx_base + dx_off, dx.to(DX.dtype.element_ty), mask=mask)


# ---- launchers -------------------------------------------------------------------


def _as_bcs(t: torch.Tensor) -> torch.Tensor:
    """[B, C, *spatial] -> a [B, C, S] view (the op layer guarantees one exists)."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:])) if t.dim() != 3 else t


def _dense_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` if it is NCHW-contiguous or channels-last (outputs allocated like it then view
    as [B, C, S]), else a contiguous copy."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    if x.is_contiguous() or (x.dim() in formats and x.is_contiguous(memory_format=formats[x.dim()])):
        return x
    return x.contiguous()


def _empty_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    out = torch.empty_like(x, dtype=dtype)  # keeps x's memory format
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def plan(batch: int, groups: int, group_channels: int, spatial: int, device: torch.device,
         splits: int | None = None):
    """Tile sizes and the split of each group's spatial run: (BLOCK_C, BLOCK_S, splits,
    tiles_per_split). By default enough splits for about four programs per SM."""
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(group_channels))
    block_s = max(16, min(triton.next_power_of_2(max(spatial, 1)), TILE_ELEMENTS // block_c))
    tiles = triton.cdiv(spatial, block_s)
    if splits is None:
        splits = triton.cdiv(4 * multiprocessor_count(device), max(1, batch * groups))
    splits = max(1, min(splits, tiles))
    tiles_per_split = triton.cdiv(tiles, splits)
    return block_c, block_s, triton.cdiv(tiles, tiles_per_split), tiles_per_split


def _num_warps(block_c: int, block_s: int) -> int:
    return max(1, min(8, block_c * block_s // 256))


def group_norm_fwd(x, weight, bias, num_groups: int, eps: float, silu: bool, splits: int | None = None):
    """Launch the forward. Returns (y, mean, rstd); y keeps x's memory format, mean and
    rstd are float32 [B * G]. ``x`` views as [B, C, S] (NCHW or channels_last; other
    strides are copied to NCHW); ``weight``, ``bias`` [C] are made contiguous if they are not."""
    x, weight, bias = _dense_layout(x), dense(weight), dense(bias)
    y = _empty_like(x)
    x3, y3 = _as_bcs(x), _as_bcs(y)
    B, C, S = x3.shape
    G, Cg = num_groups, C // num_groups
    mean = torch.empty(B * G, dtype=torch.float32, device=x.device)
    rstd = torch.empty(B * G, dtype=torch.float32, device=x.device)
    if B * C * S == 0:
        return y, mean, rstd
    block_c, block_s, splits, tiles_per_split = plan(B, G, Cg, S, x.device, splits)
    part_mean = torch.empty((B * G, splits), dtype=torch.float32, device=x.device)
    part_m2 = torch.empty_like(part_mean)
    grid = (B * G, splits)
    warps = _num_warps(block_c, block_s)
    _group_norm_stats_kernel[grid](
        x3, part_mean, part_m2, *x3.stride(), G, Cg, S, tiles_per_split,
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps,
    )
    _group_norm_apply_kernel[grid](
        x3, weight, bias, y3, part_mean, part_m2, mean, rstd, *x3.stride(), *y3.stride(),
        G, Cg, S, float(Cg * S), tiles_per_split, eps,
        SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s,
        BLOCK_SPLITS=triton.next_power_of_2(splits), num_warps=warps,
    )
    return y, mean, rstd


def group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups: int, silu: bool,
                   splits: int | None = None):
    """Launch the backward. Returns (dx, dweight, dbias); the last two float32 [C]."""
    x, weight, bias, mean, rstd = _dense_layout(x), dense(weight), dense(bias), dense(mean), dense(rstd)
    dx = _empty_like(x)
    x3, dy3, dx3 = _as_bcs(x), _as_bcs(dy), _as_bcs(dx)
    B, C, S = x3.shape
    G, Cg = num_groups, C // num_groups
    if B * C * S == 0:
        zeros = torch.zeros(C, dtype=torch.float32, device=x.device)
        return dx, zeros, zeros.clone()
    block_c, block_s, splits, tiles_per_split = plan(B, G, Cg, S, x.device, splits)
    part_a = torch.empty((B * G, splits), dtype=torch.float32, device=x.device)
    part_b = torch.empty_like(part_a)
    dw_part = torch.empty((B, splits, C), dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part)
    grid = (B * G, splits)
    warps = _num_warps(block_c, block_s)
    _group_norm_bwd_reduce_kernel[grid](
        x3, dy3, weight, bias, mean, rstd, part_a, part_b, dw_part, db_part,
        *x3.stride(), *dy3.stride(), G, C, Cg, S, tiles_per_split,
        SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps,
    )
    _group_norm_bwd_dx_kernel[grid](
        x3, dy3, weight, bias, mean, rstd, part_a, part_b, dx3,
        *x3.stride(), *dy3.stride(), *dx3.stride(), G, Cg, S, float(Cg * S), tiles_per_split,
        SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s,
        BLOCK_SPLITS=triton.next_power_of_2(splits), num_warps=warps,
    )
    return dx, dw_part.sum((0, 1)), db_part.sum((0, 1))
