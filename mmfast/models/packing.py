"""Padded prompt batches -> one packed token stream, as every complete VLM runs them.

``input_ids`` [B, Tpad] with ``attention_mask`` (padding on either side) become the
tokens of every prompt one after another, padding dropped, described by ``cu_seqlens``:
the decoder then spends no compute on padding. One host sync: the prompt lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class PackedIds:
    ids: Tensor         # [T]: the prompts' tokens, one prompt after another
    mask: Tensor        # bool [B, Tpad]: which padded positions hold tokens
    lengths: list       # host ints: tokens per prompt
    cu_seqlens: Tensor  # int32 [B+1]

    def positions(self) -> Tensor:
        """[T]: each token's index within its prompt (0 .. n - 1, padding not counted)."""
        return self.mask.cumsum(1)[self.mask] - 1


def pack_prompts(input_ids: Tensor, attention_mask: Optional[Tensor]) -> PackedIds:
    """Checks ``input_ids`` [B, T] and ``attention_mask`` (None: no padding) and packs them."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(mask.shape)}")
    lengths = mask.sum(1).tolist()
    if min(lengths) == 0:
        raise ValueError("attention_mask: every sequence needs at least one token")
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0, dtype=torch.int32).to(input_ids.device)
    return PackedIds(input_ids[mask], mask, lengths, cu_seqlens)
