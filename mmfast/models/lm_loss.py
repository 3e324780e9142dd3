"""The training loss of the complete models: Hugging Face's causal-LM loss, computed from
the packed final hidden states through the fused linear cross-entropy, so the [B, T, V]
logits are never formed.

Semantics are transformers' ``ForCausalLMLoss``: position t predicts ``labels[:, t + 1]``
(the shift happens here, the caller passes labels aligned with ``input_ids``), labels
equal to -100 are ignored, the loss is the mean over the remaining tokens, or their sum
divided by ``num_items_in_batch`` when that is given (gradient accumulation over
micro-batches). One addition: padding positions (``attention_mask`` 0) are ignored as
if labelled -100, since the packed stream has no hidden state for them (transformers
would score whatever its logits at padding say unless the collator put -100 there, as
collators do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from mmfast.ops.linear_cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """What ``forward(..., labels=...)`` returns: the loss, and no logits (the fused loss
    never forms them)."""

    loss: Tensor
    logits: Optional[Tensor] = None


def packed_shifted_labels(labels: Tensor, mask: Tensor) -> Tensor:
    """The next-token target of every packed token: ``labels`` [B, T] shifted left by one,
    -100 at each sequence's last position and wherever ``mask`` [B, T] is False, then
    gathered at the positions the packed stream holds (``mask``, row-major)."""
    if not isinstance(labels, Tensor) or labels.shape != mask.shape:
        raise ValueError(f"labels: expected shape {tuple(mask.shape)} (that of input_ids), "
                         f"got {tuple(getattr(labels, 'shape', ())) or type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer dtype (token ids or -100), got {labels.dtype}")
    labels = labels.to(mask.device).masked_fill(~mask, IGNORE_INDEX)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return shifted[mask]


def causal_lm_loss(hidden: Tensor, lm_head: nn.Linear, labels: Tensor, mask: Tensor,
                   num_items_in_batch: Union[Tensor, int, None] = None) -> Tensor:
    """transformers' causal-LM loss of the packed ``hidden`` [T, C] under ``lm_head``."""
    targets = packed_shifted_labels(labels, mask)
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden, lm_head.weight, targets, bias=lm_head.bias, ignore_index=IGNORE_INDEX)
    total = linear_cross_entropy(hidden, lm_head.weight, targets, bias=lm_head.bias, ignore_index=IGNORE_INDEX,
                                 reduction="sum")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
