"""Triton kernel for the channel-first RMS normalisation of video VAEs (Wan's
``WanRMS_norm``), optionally followed by SiLU, in one pass.

Shapes: X, Y are viewed as [B, C, S] through strides (S = the flattened spatial / time
extent, NCDHW-contiguous or channels-last alike). W, BIAS are [C]. For each (b, s):

    z = x / max(||x[b, :, s]||_2, 1e-12) * sqrt(C) * w + bias,   y = z  or  z * sigmoid(z)

(``F.normalize`` over the channels, as diffusers does), float32 inside. One program takes
all C channels of BLOCK_S positions: a [BLOCK_C, BLOCK_S] tile read once (coalesced
along the positions in NCDHW), reduced over the channels in registers, written once.
"""

import torch
import triton
import triton.language as tl

from ._launch import empty

# Channels held in one register tile (Wan's VAE has at most 384 a layer).
MAX_C = 1024
# Elements of one register tile (channels x positions).
TILE_ELEMENTS = 8192
# Positions per tile at least: 32 bf16 values are a 64-byte run of each channel row in
# NCDHW, two full 32-byte sectors (a narrower run would waste part of every sector).
MIN_BLOCK_S = 32


@triton.jit
def _channel_rms_norm_fwd_kernel(
    X, W, BIAS, Y,
    stride_xb, stride_xc, stride_xs, stride_yb, stride_yc, stride_ys,
    C, S, scale,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    s0 = tl.program_id(0) * BLOCK_S
    b = tl.program_id(1).to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    ss = s0 + tl.arange(0, BLOCK_S)
    mask = (cs < C)[:, None] & (ss < S)[None, :]
    x_offsets = b * stride_xb + cs.to(tl.int64)[:, None] * stride_xc + ss.to(tl.int64)[None, :] * stride_xs
    x = tl.load(X + x_offsets, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=0))
    # max() as torch.clamp_min: a NaN norm stays NaN (tl.maximum would drop it for 1e-12)
    inv = scale / tl.where(norm != norm, norm, tl.maximum(norm, 1e-12))
    w = tl.load(W + cs, mask=cs < C, other=0.0).to(tl.float32)
    z = x * inv[None, :] * w[:, None]
    if HAS_BIAS:
        z += tl.load(BIAS + cs, mask=cs < C, other=0.0).to(tl.float32)[:, None]
    if SILU:
        z = z * tl.sigmoid(z)
    y_offsets = b * stride_yb + cs.to(tl.int64)[:, None] * stride_yc + ss.to(tl.int64)[None, :] * stride_ys
    tl.store(Y + y_offsets, z.to(Y.dtype.element_ty), mask=mask)


def channel_rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool):
    """Launch the forward: y [B, C, *spatial], contiguous, x's dtype. ``x`` is read
    through its strides once viewed as [B, C, S] (made contiguous when it cannot be)."""
    batch, channels = x.shape[0], x.shape[1]
    try:
        x3 = x.view(batch, channels, -1)
    except RuntimeError:  # spatial dims that do not flatten into one stride
        x3 = x.contiguous().view(batch, channels, -1)
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    y3 = y.view(batch, channels, -1)
    positions = x3.shape[2]
    if y.numel() == 0:
        return y
    block_c = triton.next_power_of_2(channels)
    block_s = min(triton.next_power_of_2(positions), max(MIN_BLOCK_S, TILE_ELEMENTS // block_c))
    weight = weight.contiguous()
    bias_arg = bias.contiguous() if bias is not None else weight
    grid = (triton.cdiv(positions, block_s), batch)
    _channel_rms_norm_fwd_kernel[grid](
        x3, weight, bias_arg, y3, *x3.stride(), *y3.stride(), channels, positions, float(channels) ** 0.5,
        HAS_BIAS=bias is not None, SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s,
        num_warps=4 if block_c * block_s <= 2048 else (8 if block_c * block_s <= 8192 else 16),
    )
    return y
