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

open_clip's other API is there too, for subclasses (CoCa-, distillation-style) and code
that calls it: ``get_logits`` (the dense logits, open_clip's gathering included),
``get_ground_truth`` with the ``labels`` / ``prev_num_logits`` cache, SigLIP's ``_loss``
with ``negative_only`` and the ``chunk_size`` argument. ``forward`` runs the fused loss;
a subclass that overrides ``get_logits`` or ``get_ground_truth`` (ClipLoss), or ``_loss``
(SigLipLoss), gets open_clip's composition of them instead, so the override takes effect.

Differences from open_clip: SigLipLoss's loss is the global batch's, sum / global B, on
every rank, where open_clip reports each rank's rows, sum / local B (equal on average
over ranks for equal shards). With ``world_size > 1``, ClipLoss gives each rank a share
of ``logit_scale``'s gradient (the shares differ between ranks and sum to world_size times
the global loss's gradient), where open_clip (``local_loss=False``) gives every rank the
global loss's whole gradient: after DDP averages them the gradients are the same.
``logit_bias`` may be None or, with ``learn_logit_bias``, omitted. ``use_horovod=True``
is accepted (the attribute is kept) and raises on a multi-rank call, where open_clip
needs Horovod; ``chunk_size`` changes nothing (the fused loss never holds the B x B
logits).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
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
        if world_size < 1:
            raise ValueError(f"world_size: expected >= 1, got {world_size}")
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.group, self.strategy, self.backend = group, strategy, backend
        # open_clip's label cache (get_ground_truth)
        self.prev_num_logits = 0
        self.labels = {}

    def _group(self):
        if self.world_size == 1:
            return None
        if self.use_horovod:  # open_clip fails here too, on use, when Horovod is missing
            raise ValueError("use_horovod: Horovod is not supported; use torch.distributed (group=)")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"world_size={self.world_size} needs torch.distributed to be initialised")
        group = self.group if self.group is not None else dist.group.WORLD
        if dist.get_world_size(group) != self.world_size:
            raise ValueError(f"world_size: {self.world_size} given, but the process group has "
                             f"{dist.get_world_size(group)} ranks")
        return group

    def _out(self, loss, output_dict, scale_grad=True):
        if scale_grad:
            loss = _scale_grad(loss, self.world_size)
        return {"contrastive_loss": loss} if output_dict else loss

    def _gather_with_grad(self, t):
        """All ranks' ``t`` concatenated, gradients flowing back to each rank's part."""
        import torch.distributed.nn as dist_nn

        return torch.cat(dist_nn.all_gather(t, group=self._group()), dim=0)

    def _overridden(self, base, *names) -> bool:
        """Whether a subclass overrides any of ``base``'s methods ``names``."""
        return any(getattr(type(self), n) is not getattr(base, n) for n in names)


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

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        """open_clip's: arange(num_logits) (offset by rank with ``local_loss``), cached per
        device when ``cache_labels``."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
        else:
            labels = self.labels[device]
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's dense (logits_per_image, logits_per_text), B x B (local rows x global
        columns with ``local_loss``); features are gathered over ranks as open_clip does."""
        if self.world_size > 1:
            all_image, all_text = self._gather(image_features), self._gather(text_features)
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_text.T
                logits_per_text = logit_scale * text_features @ all_image.T
            else:
                logits_per_image = logit_scale * all_image @ all_text.T
                logits_per_text = logits_per_image.T
        else:
            logits_per_image = logit_scale * image_features @ text_features.T
            logits_per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        return logits_per_image, logits_per_text

    def _gather(self, t):
        """open_clip's gather_features for one tensor."""
        if self.gather_with_grad:
            return self._gather_with_grad(t)
        parts = [torch.zeros_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self._group())
        if not self.local_loss:
            parts[self.rank] = t  # the local rank's part keeps its gradient
        return torch.cat(parts, dim=0)

    def forward(self, image_features, text_features, logit_scale=None, logit_bias=None, output_dict=False):
        if logit_scale is None:
            if self.logit_scale is None:
                raise ValueError("logit_scale: required (or construct with learn_logit_scale=True)")
            logit_scale = self.logit_scale.exp()
        if self._overridden(ClipLoss, "get_logits", "get_ground_truth"):  # open_clip's composition
            logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale,
                                                                logit_bias=logit_bias)
            labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
            loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
            return self._out(loss, output_dict, scale_grad=False)
        loss = clip_loss(image_features, text_features, logit_scale, group=self._group(),
                         strategy=self.strategy, backend=self.backend)
        if self.cache_labels:  # the label cache open_clip's forward leaves behind
            rows = image_features.shape[0] * (1 if self.local_loss else self.world_size)
            self.get_ground_truth(image_features.device, rows)
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

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, chunk_size=0, *,
                 use_horovod=False, learn_logit_scale=False, learn_logit_bias=False,
                 init_logit_scale=math.log(10.0), init_logit_bias=-10.0, group=None, strategy=None, backend=None):
        if dist_impl is not None and dist_impl not in _DIST_IMPL:
            raise ValueError(f"dist_impl: expected one of {', '.join(_DIST_IMPL)} or None, got {dist_impl!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"chunk_size: expected an integer >= 0, got {chunk_size!r}")
        strategy = strategy or _DIST_IMPL[dist_impl or "bidir"]
        super().__init__(rank, world_size, group, strategy, backend, use_horovod)
        self.cache_labels, self.dist_impl, self.chunk_size = cache_labels, dist_impl or "bidir", chunk_size
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale))) if learn_logit_scale else None
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if learn_logit_bias else None

    def forward(self, image_features, text_features, logit_scale=None, logit_bias=None, output_dict=False):
        if logit_scale is None:
            if self.logit_scale is None:
                raise ValueError("logit_scale: required (or construct with learn_logit_scale=True)")
            logit_scale = self.logit_scale.exp()
        if logit_bias is None and self.logit_bias is not None:
            logit_bias = self.logit_bias
        if self._overridden(SigLipLoss, "_loss", "get_logits", "get_ground_truth"):
            # open_clip's composition (its "gather" exchange), so that the override counts
            loss = self._loss(image_features, text_features, logit_scale, logit_bias)
            if self.world_size > 1:
                all_text = self._gather_with_grad(text_features).chunk(self.world_size, dim=0)
                for i, text in enumerate(all_text):
                    if i != self.rank:
                        loss = loss + self._loss(image_features, text, logit_scale, logit_bias, negative_only=True)
            return self._out(loss, output_dict, scale_grad=False)
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, group=self._group(),
                           strategy=self.strategy, backend=self.backend)
        return self._out(loss, output_dict)

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        """open_clip's: 2 I - 1 (all -1 with ``negative_only``), [num_logits, num_logits]."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's dense logits, s x y^T (+ b)."""
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:
            logits = logits + logit_bias
        return logits

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        """open_clip's loss of one shard pair, sum / B, fused (``negative_only``: the pairs
        of two different shards, every pair a negative). Dense, as open_clip's, when a
        subclass overrides get_logits or get_ground_truth."""
        if self._overridden(SigLipLoss, "get_logits", "get_ground_truth"):
            logits = self.get_logits(image_features, text_features, logit_scale, logit_bias)
            labels = self.get_ground_truth(image_features.device, image_features.dtype, image_features.shape[0],
                                           negative_only=negative_only)
            return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend,
                           negative_only=negative_only)
