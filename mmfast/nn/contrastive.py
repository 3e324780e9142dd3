"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss``, on the fused
O(B)-memory losses of mmfast.ops, with an optional learnable scale (and bias).

Same constructor arguments (those that only choose how open_clip gathers features are
accepted and have nothing left to choose: the loss here is always the exact loss of the
global batch) and the same ``forward(image_features, text_features, logit_scale,
[logit_bias], output_dict=False)``, returning the loss or ``{"contrastive_loss": loss}``.
``logit_scale`` is the multiplier (open_clip passes ``model.logit_scale.exp()``).

With ``world_size > 1`` (torch.distributed initialised) each rank passes its shard; the
loss is that of the global batch. Under DDP, which averages gradients over ranks, the
modules scale their gradients by the world size so that the averaged gradient is the
global loss's, as with open_clip (the loss value is not scaled).

Differences from open_clip: SigLipLoss's loss is the global batch's, sum / global B, on
every rank, where open_clip reports each rank's rows, sum / local B (equal on average
over ranks for equal shards); ``logit_bias`` may be None or, with ``learn_logit_bias``,
omitted; ``use_horovod`` is not supported.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from mmfast.ops.contrastive import clip_loss, siglip_loss

# open_clip's dist_impl values and the strategy that does the same job.
_DIST_IMPL = {"bidir": "ring", "shift": "ring", "reduce": "all_gather", "gather": "all_gather"}


def _scale_grad(loss: torch.Tensor, factor: float) -> torch.Tensor:
    """``loss`` unchanged in value, its gradient multiplied by ``factor``."""
    if factor == 1:
        return loss
    return loss.detach() + factor * (loss - loss.detach())


class _ContrastiveLoss(nn.Module):
    def __init__(self, rank, world_size, group, strategy, backend, use_horovod=False):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod: Horovod is not supported; use torch.distributed (group=)")
        if world_size < 1:
            raise ValueError(f"world_size: expected >= 1, got {world_size}")
        self.rank, self.world_size = rank, world_size
        self.group, self.strategy, self.backend = group, strategy, backend

    def _group(self):
        if self.world_size == 1:
            return None
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"world_size={self.world_size} needs torch.distributed to be initialised")
        group = self.group if self.group is not None else dist.group.WORLD
        if dist.get_world_size(group) != self.world_size:
            raise ValueError(f"world_size: {self.world_size} given, but the process group has "
                             f"{dist.get_world_size(group)} ranks")
        return group

    def _out(self, loss, output_dict):
        loss = _scale_grad(loss, self.world_size)
        return {"contrastive_loss": loss} if output_dict else loss


class ClipLoss(_ContrastiveLoss):
    """open_clip's ``ClipLoss`` (softmax InfoNCE, both directions averaged), fused.

    ``learn_logit_scale=True`` adds a parameter ``logit_scale`` (log of the multiplier,
    initialised to ``init_logit_scale``, open_clip's log(1/0.07)) used when forward gets
    no ``logit_scale``. ``logit_bias`` is accepted, as open_clip's, and changes nothing
    (cross-entropy ignores a shift shared by a row); it gets a zero gradient.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
                 world_size=1, use_horovod=False, *, learn_logit_scale=False,
                 init_logit_scale=math.log(1 / 0.07), group=None, strategy="all_gather", backend=None):
        super().__init__(rank, world_size, group, strategy, backend, use_horovod)
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale))) if learn_logit_scale else None

    def forward(self, image_features, text_features, logit_scale=None, logit_bias=None, output_dict=False):
        if logit_scale is None:
            if self.logit_scale is None:
                raise ValueError("logit_scale: required (or construct with learn_logit_scale=True)")
            logit_scale = self.logit_scale.exp()
        loss = clip_loss(image_features, text_features, logit_scale, group=self._group(),
                         strategy=self.strategy, backend=self.backend)
        if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
            loss = loss + 0 * logit_bias.sum()
        return self._out(loss, output_dict)


class SigLipLoss(_ContrastiveLoss):
    """open_clip's ``SigLipLoss`` (pairwise sigmoid, sum / B), fused.

    ``learn_logit_scale`` / ``learn_logit_bias`` add parameters ``logit_scale`` (log of the
    multiplier, SigLIP's log 10) and ``logit_bias`` (SigLIP's -10), used when forward gets
    none. ``dist_impl`` (open_clip's 'bidir', 'shift', 'reduce', 'gather') picks the ring
    or the all-gather strategy unless ``strategy`` is given.
    """

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, *,
                 learn_logit_scale=False, learn_logit_bias=False, init_logit_scale=math.log(10.0),
                 init_logit_bias=-10.0, group=None, strategy=None, backend=None):
        if dist_impl is not None and dist_impl not in _DIST_IMPL:
            raise ValueError(f"dist_impl: expected one of {', '.join(_DIST_IMPL)} or None, got {dist_impl!r}")
        strategy = strategy or _DIST_IMPL[dist_impl or "bidir"]
        super().__init__(rank, world_size, group, strategy, backend)
        self.cache_labels, self.dist_impl = cache_labels, dist_impl or "bidir"
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale))) if learn_logit_scale else None
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if learn_logit_bias else None

    def forward(self, image_features, text_features, logit_scale=None, logit_bias=None, output_dict=False):
        if logit_scale is None:
            if self.logit_scale is None:
                raise ValueError("logit_scale: required (or construct with learn_logit_scale=True)")
            logit_scale = self.logit_scale.exp()
        if logit_bias is None and self.logit_bias is not None:
            logit_bias = self.logit_bias
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, group=self._group(),
                           strategy=self.strategy, backend=self.backend)
        return self._out(loss, output_dict)
