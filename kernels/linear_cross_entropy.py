"""Triton kernel of the fused linear cross-entropy: the softmax part over one chunk of
logits, loss and gradient in one launch, the gradient written over the logits.

Shapes: LOGITS [n, V] (row stride ``stride_row``, unit column stride), TARGET [n] int,
LOSS [n] float32, ROW_SCALE [n] float32 with stride ``stride_scale`` (0: one scale for
every row). One program per row; the row is read in BLOCK_V-wide blocks.

Per row with target y, smoothing e, z-loss weight s (all in float32):

    lse   = log sum_j exp(z_j)                          (online max and sum over blocks)
    loss  = (1 - e) (lse - z_y) + e (lse - mean_j z_j) + s lse^2
    dz_j  = row_scale * (p_j (1 + 2 s lse) - e / V - (1 - e) [j == y]),  p = softmax(z)

which is torch.nn.functional.cross_entropy (label_smoothing=e) plus PaLM's z-loss. A row
whose target is ``ignore_index`` gets loss 0 and gradient 0; a row whose target is
outside [0, V) gets NaN for both (no host sync is spent on checking targets: the NaN is
the signal). With WRITE_GRAD the row is read twice (statistics, then gradient) and
written once; without it, read once.
"""

import torch
import triton
import triton.language as tl

from ._launch import dense, empty

# Columns per block of the row loop. Bandwidth-bound and untuned (no GPU measured yet).
BLOCK_V_MAX = 4096


@triton.jit
def _linear_cross_entropy_fwd_kernel(
    LOGITS, TARGET, LOSS, ROW_SCALE,
    stride_row, stride_scale, V, ignore_index, smoothing, z_loss,
    WRITE_GRAD: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    target = tl.load(TARGET + row).to(tl.int64)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < V)
    cols = tl.arange(0, BLOCK_V)

    top = float("-inf")  # running max
    total = 0.0          # running sum of exp(z - top)
    z_sum = 0.0          # sum of the logits, for label smoothing
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = tl.load(ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        new_top = tl.maximum(top, tl.max(z, axis=0))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(z - new_top), axis=0)
        top = new_top
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(offs < V, z, 0.0), axis=0)
    lse = top + tl.log(total)

    z_target = tl.load(ptr + target, mask=in_range, other=0.0).to(tl.float32)
    loss = (1.0 - smoothing) * (lse - z_target) + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss += smoothing * (lse - z_sum / V)
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(LOSS + row, tl.where(ignored, 0.0, loss))

    if WRITE_GRAD:
        scale = tl.load(ROW_SCALE + row * stride_scale).to(tl.float32)
        scale = tl.where(ignored, 0.0, tl.where(in_range, scale, float("nan")))
        p_coef = 1.0 + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = tl.load(ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) * p_coef - smoothing / V
            g = tl.where(offs == target, g - (1.0 - smoothing), g)
            tl.store(ptr + offs, (g * scale).to(LOGITS.dtype.element_ty), mask=offs < V)


def linear_cross_entropy_fwd(logits: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor,
                             ignore_index: int, label_smoothing: float, z_loss: float,
                             write_grad: bool) -> torch.Tensor:
    """Per-row losses (float32 [n]) of ``logits`` [n, V] against ``target`` [n]; with
    ``write_grad``, ``logits`` is overwritten with ``row_scale[i] * d loss_i / d logits``.

    ``row_scale`` is float32 [n], or any [n] view with stride 0 (one scale for all rows).
    The backward of a per-row loss calls this again, with its upstream gradient as the
    scale, on recomputed logits.
    """
    n, v = logits.shape
    target = dense(target)  # read flat
    loss = empty((n,), dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    if logits.stride(1) != 1:
        raise ValueError("logits: expected unit stride along the vocabulary")
    block_v = min(BLOCK_V_MAX, triton.next_power_of_2(v))
    _linear_cross_entropy_fwd_kernel[(n,)](
        logits, target, loss, row_scale,
        logits.stride(0), row_scale.stride(0), v, ignore_index, label_smoothing, z_loss,
        WRITE_GRAD=write_grad, HAS_SMOOTHING=label_smoothing != 0.0, BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return loss
