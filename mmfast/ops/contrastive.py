"""Contrastive losses without the B x B logits: CLIP (softmax), SigLIP (sigmoid), NT-Xent.

For image features x [B, D], text features y [B, D] (pair i <-> i), a scale s and a
bias b (0-d tensors that may require grad), logits L_ij = s x_i.y_j (+ b):

    clip_loss    (1/2B) sum_i [ lse_j L_ij - L_ii ] + (1/2B) sum_j [ lse_i L_ij - L_jj ]
                 = open_clip ClipLoss: (CE(L, arange) + CE(L.T, arange)) / 2
    siglip_loss  (1/B) sum_ij softplus(-y_ij L_ij),  y = 2 I - 1
                 = open_clip SigLipLoss: -logsigmoid(y * L).sum() / B
    nt_xent_loss z [2N, D] holds two views, row i and row i + N a positive pair;
                 with cosine similarities c_ij and s = 1 / temperature,
                 (1/2N) sum_i [ log sum_{j != i} exp(s c_ij) - s c_i,p(i) ]   (SimCLR)

The forward keeps only the row and column log-sum-exp statistics (softmax; each as a max
and a log-sum, so that huge logits lose no precision) or per-row sums (sigmoid), O(B);
the backward recomputes score tiles on the same tile grid. Scores accumulate in float32
(float64 for float64 features). Gradients flow to both feature tensors, the scale and
the bias. The loss has the features' dtype (as open_clip's), gradients their inputs'.

``group=`` (a torch.distributed process group) makes each rank's features a shard of a
global batch: see mmfast.ops.contrastive_dist for the strategies and gradient convention.

Backends (family ``contrastive``, see mmfast.ops.contrastive_blocks): ``triton`` (fused
tiled kernels; fp16, bf16, fp32), ``torch`` (chunked PyTorch; any floating dtype).
"""

from __future__ import annotations

import math

from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.dispatch import Call
from mmfast.ops.contrastive_blocks import CONTRASTIVE, softmax_loss_terms

REDUCTIONS = ("mean", "sum")

# ---- references (dense, B x B; the test oracle) -------------------------------------


def clip_loss_reference(image_features, text_features, logit_scale, reduction="mean"):
    """open_clip's ClipLoss, computed densely in the features' dtype."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels, reduction=reduction)
            + F.cross_entropy(logits.T, labels, reduction=reduction)) / 2
    return loss


def siglip_loss_reference(image_features, text_features, logit_scale, logit_bias=None):
    """open_clip's SigLipLoss, computed densely in the features' dtype."""
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def nt_xent_reference(z, temperature):
    """SimCLR's NT-Xent over 2N views (rows i and i + N a positive pair), densely."""
    n2 = z.shape[0]
    zn = F.normalize(z, dim=-1)
    logits = (zn @ zn.T) / temperature
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    targets = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    return F.cross_entropy(logits, targets)


# ---- shared pieces ---------------------------------------------------------------------


def grad_coef(grad_out: Tensor, scale: Tensor, norm: float) -> Tensor:
    """[c s, c] with c = upstream gradient * norm, float32 on the device (no sync)."""
    c = grad_out.float() * norm
    return torch.stack([c * scale.float(), c])


def _reduce_grad(g: Tensor, like: Tensor | None, needed: bool):
    if not needed or like is None:
        return None
    return g.to(like.dtype).reshape(like.shape)


# ---- autograd ------------------------------------------------------------------------


class ClipLossFunction(torch.autograd.Function):
    """Softmax contrastive loss; ``norm`` is 1/(2B) for a mean, 1/2 for a sum."""

    @staticmethod
    def forward(ctx, x, y, scale, norm, blocks):
        s = scale.detach()
        lse_rows, pos_rows = blocks.lse_rows(x, y, s, 0)
        lse_cols, pos_cols = blocks.lse_cols(x, y, s, 0)
        # Per-row differences first: lse and the positive logit cancel when one pair dominates.
        total = softmax_loss_terms(lse_rows, pos_rows).sum() + softmax_loss_terms(lse_cols, pos_cols).sum()
        ctx.save_for_backward(x, y, scale, lse_rows, lse_cols)
        ctx.norm, ctx.blocks = norm, blocks
        return (total * norm).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, scale, lse_rows, lse_cols = ctx.saved_tensors
        s = scale.detach()
        coef = grad_coef(grad_out, s, ctx.norm)
        args = (x, y, s, None, lse_rows, lse_cols, coef, 0, None, "clip", False)
        dx, ds, _ = ctx.blocks.grad_rows(*args, x.dtype)
        dy = ctx.blocks.grad_cols(*args, y.dtype)
        return dx, dy, _reduce_grad(ds, scale, ctx.needs_input_grad[2]), None, None


class SigLipLossFunction(torch.autograd.Function):
    """Sigmoid contrastive loss, summed over all pairs and divided by B; ``pair`` 0 (pair
    i <-> i positive) or None (every pair negative: open_clip's ``negative_only``)."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, blocks, pair=0):
        rows = blocks.sigmoid_rows(x, y, scale.detach(), bias.detach(), pair)
        ctx.save_for_backward(x, y, scale, bias)
        ctx.blocks, ctx.pair = blocks, pair
        return (rows.sum() / x.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, scale, bias = ctx.saved_tensors
        s, b = scale.detach(), bias.detach()
        coef = grad_coef(grad_out, s, 1.0 / x.shape[0])
        args = (x, y, s, b, None, None, coef, ctx.pair, None, "sigmoid", False)
        dx, ds, dbias = ctx.blocks.grad_rows(*args, x.dtype)
        dy = ctx.blocks.grad_cols(*args, y.dtype)
        return (dx, dy, _reduce_grad(ds, scale, ctx.needs_input_grad[2]),
                _reduce_grad(dbias, bias, ctx.needs_input_grad[3]), None, None)


class NtXentFunction(torch.autograd.Function):
    """NT-Xent over unit rows zn [2N, D] at scale s = 1 / temperature."""

    @staticmethod
    def forward(ctx, zn, scale, blocks):
        n = zn.shape[0] // 2
        s = scale.detach()
        # Row i pairs with column i + N or i - N (both ways) and leaves out column i.
        lse, pos = blocks.lse_rows(zn, zn, s, n, 0, True)
        total = softmax_loss_terms(lse, pos).sum()
        ctx.save_for_backward(zn, scale, lse)
        ctx.blocks = blocks
        return (total / (2 * n)).to(zn.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        zn, scale, lse = ctx.saved_tensors
        n = zn.shape[0] // 2
        s = scale.detach()
        coef = grad_coef(grad_out, s, 1.0 / (2 * n))
        # zn is both sides of its score matrix: d zn_i = c s (sum_j G'_ij zn_j + sum_j G'_ji zn_j)
        # with G' = P - [positive] of the row softmax; the second sum is the column pass.
        args = (zn, zn, s, None, lse, None, coef, n, 0, "rows", True)
        d_rows, ds, _ = ctx.blocks.grad_rows(*args, torch.float32)
        d_cols = ctx.blocks.grad_cols(*args, torch.float32)
        return (d_rows + d_cols).to(zn.dtype), _reduce_grad(ds, scale, ctx.needs_input_grad[1]), None


# ---- argument checks -------------------------------------------------------------------


def check_features(name: str, t, other_name: str | None = None, other: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [batch, dim], got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if other is None:
        return
    if t.shape != other.shape:
        raise ValueError(f"{name}: expected shape {tuple(other.shape)} (that of {other_name}), "
                         f"got {tuple(t.shape)}")
    if t.device != other.device:
        raise ValueError(f"{name}: expected device {other.device} (that of {other_name}), got {t.device}")
    if t.dtype != other.dtype:
        raise TypeError(f"{name}: expected dtype {other.dtype} (that of {other_name}), got {t.dtype}")


def as_scalar(name: str, value, like: Tensor) -> Tensor:
    """A number or a one-element tensor on ``like``'s device, as a tensor (grad kept)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name}: expected a scalar (a 0-d or one-element tensor), got shape "
                             f"{tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating dtype, got {value.dtype}")
        if value.device != like.device:
            raise ValueError(f"{name}: expected device {like.device} (that of the features), got {value.device}")
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name}: expected a number or a 0-d tensor, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not math.isfinite(number):  # a number is checked for free; a device tensor would sync
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return torch.tensor(number, dtype=torch.float32, device=like.device)


def select_blocks(x: Tensor, backend):
    return CONTRASTIVE.select(Call(device=x.device, dtype=x.dtype), backend).run(x.device)


# ---- public functions --------------------------------------------------------------------


def clip_loss(image_features, text_features, logit_scale, *, reduction="mean", group=None,
              strategy="all_gather", backend=None):
    """open_clip's CLIP loss, fused and tiled: ``logit_scale`` is the multiplier (already
    exponentiated), pair i <-> i the positive. ``reduction``: "mean" (open_clip's) or
    "sum" (B times the mean). ``group``: see mmfast.ops.contrastive_dist.

    Example::

        >>> x = F.normalize(torch.randn(8, 64), dim=-1)
        >>> y = F.normalize(torch.randn(8, 64), dim=-1)
        >>> mmfast.ops.clip_loss(x, y, torch.tensor(100.0)).shape
        torch.Size([])
    """
    def checked():
        check_features("image_features", image_features)
        check_features("text_features", text_features, "image_features", image_features)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        return as_scalar("logit_scale", logit_scale, image_features), select_blocks(image_features, backend)

    if group is not None:
        from mmfast.ops.contrastive_dist import distributed_clip_loss

        return distributed_clip_loss(checked, image_features, text_features, reduction, group, strategy)
    scale, blocks = checked()
    b = image_features.shape[0]
    if b == 0:
        raise ValueError("image_features: expected at least one row (the loss of an empty batch is undefined)")
    norm = 1.0 / (2 * b) if reduction == "mean" else 0.5
    return ClipLossFunction.apply(image_features, text_features, scale, norm, blocks)


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *, group=None,
                strategy="all_gather", backend=None, negative_only=False):
    """open_clip's SigLIP loss, fused and tiled: -logsigmoid(y * (s x.y^T + b)).sum() / B
    with y = 2 I - 1 (y = -1 everywhere with ``negative_only``: the pairs of two different
    shards). ``logit_bias`` may be None (no bias). ``group``: see
    mmfast.ops.contrastive_dist.

    Example::

        >>> x = F.normalize(torch.randn(8, 64), dim=-1)
        >>> y = F.normalize(torch.randn(8, 64), dim=-1)
        >>> mmfast.ops.siglip_loss(x, y, torch.tensor(10.0), torch.tensor(-10.0)).shape
        torch.Size([])
    """
    def checked():
        check_features("image_features", image_features)
        check_features("text_features", text_features, "image_features", image_features)
        scale = as_scalar("logit_scale", logit_scale, image_features)
        bias = as_scalar("logit_bias", 0.0 if logit_bias is None else logit_bias, image_features)
        return scale, bias, select_blocks(image_features, backend)

    if group is not None:
        if negative_only:
            raise ValueError("negative_only: a loss over a process group has its positive pairs")
        from mmfast.ops.contrastive_dist import distributed_siglip_loss

        return distributed_siglip_loss(checked, image_features, text_features, group, strategy)
    scale, bias, blocks = checked()
    if image_features.shape[0] == 0:
        raise ValueError("image_features: expected at least one row (the loss of an empty batch is undefined)")
    return SigLipLossFunction.apply(image_features, text_features, scale, bias, blocks,
                                    None if negative_only else 0)


def nt_xent_loss(z, temperature, *, backend=None):
    """SimCLR's NT-Xent: ``z`` [2N, D] holds two views, rows i and i + N a positive pair;
    cosine similarities over ``temperature`` (a number, or a 0-d tensor that may require
    grad); each row's own similarity is left out.

    Example::

        >>> z = torch.randn(16, 32)       # 8 images, two views each
        >>> mmfast.ops.nt_xent_loss(z, 0.5).shape
        torch.Size([])
    """
    check_features("z", z)
    if z.shape[0] < 2 or z.shape[0] % 2:
        raise ValueError(f"z: expected an even number >= 2 of rows (two views per sample), got {z.shape[0]}")
    # Only a number is checked: reading a device tensor would sync.
    if isinstance(temperature, Real) and not isinstance(temperature, bool) and not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    temperature = as_scalar("temperature", temperature, z)
    blocks = select_blocks(z, backend)
    cd = torch.float64 if z.dtype == torch.float64 else torch.float32
    zn = F.normalize(z.to(cd), dim=-1).to(z.dtype)
    return NtXentFunction.apply(zn, 1.0 / temperature, blocks)
