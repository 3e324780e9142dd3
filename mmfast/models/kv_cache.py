"""A key/value cache for batched decoding with sequences of different lengths.

Each layer keeps K and V in padded buffers [B, capacity, Hk, D]; sequence b's tokens
fill positions 0 .. lengths[b] - 1. The lengths live on the host: a generate loop knows
them (every sequence gains the same number of tokens each step), so planning a step
reads nothing back from the device.

A forward step appends ``new_lengths[b]`` tokens to every sequence, packed
[sum(new_lengths), Hk, D] as the decoder's token stream is. :meth:`KVCache.plan` returns
the index plumbing for that step once; every layer then calls :meth:`KVCache.update`,
which writes its new K/V into the buffers and returns what attention reads:

- all sequences equally long (batch 1, equal prompts): padded views
  ``[B, length, Hk, D]`` of the buffers, no copy;
- otherwise: the valid keys gathered into a packed stream with ``cu_seqlens_k`` (one
  gather per layer and step; a paged / ``seqused_k`` attention kernel would read the
  buffers in place, left for later).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class CacheStep:
    """Index plumbing of one forward step, shared by every layer."""
    write_index: Tensor              # [sum(new)] flat slots (b * capacity + position) of the new tokens
    read_index: Optional[Tensor]     # [sum(total)] flat slots to gather, None on the padded path
    cu_seqlens_k: Optional[Tensor]   # int32 [B+1] over the gathered keys, None on the padded path
    max_seqlen_k: int
    total_length: Optional[int]      # the common length on the padded path
    new_lengths: tuple[int, ...]


class KVCache:
    """K/V buffers for ``num_layers`` layers of ``batch`` sequences, ``capacity`` tokens each."""

    def __init__(self, num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str | None = None):
        shape = (batch, capacity, num_kv_heads, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch, self.capacity = batch, capacity
        self.lengths = [0] * batch

    def plan(self, new_lengths: Sequence[int]) -> CacheStep:
        new_lengths = tuple(int(n) for n in new_lengths)
        if len(new_lengths) != self.batch:
            raise ValueError(f"new_lengths: expected {self.batch} entries (the batch), got {len(new_lengths)}")
        totals = [old + new for old, new in zip(self.lengths, new_lengths)]
        if max(totals) > self.capacity:
            raise ValueError(f"KVCache: {max(totals)} tokens exceed the capacity {self.capacity}")
        device = self.keys[0].device if self.keys else None
        write = torch.cat([torch.arange(old, total) + b * self.capacity
                           for b, (old, total) in enumerate(zip(self.lengths, totals))])
        write = write.to(device, non_blocking=True)
        if len(set(totals)) == 1 and len(set(new_lengths)) == 1:
            return CacheStep(write, None, None, totals[0], totals[0], new_lengths)
        read = torch.cat([torch.arange(total) + b * self.capacity for b, total in enumerate(totals)])
        cu = torch.tensor([0] + totals, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return CacheStep(write, read.to(device, non_blocking=True), cu.to(device, non_blocking=True),
                         max(totals), None, new_lengths)

    def update(self, layer: int, step: CacheStep, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the step's packed k, v [sum(new), Hk, D] for ``layer``; return the keys
        and values attention reads: padded [B, length, Hk, D] or packed [sum(total), Hk, D]."""
        flat_k = self.keys[layer].view(-1, *k.shape[1:])
        flat_v = self.values[layer].view(-1, *v.shape[1:])
        flat_k.index_copy_(0, step.write_index, k.to(flat_k.dtype))
        flat_v.index_copy_(0, step.write_index, v.to(flat_v.dtype))
        if step.read_index is None:
            length = step.total_length
            return self.keys[layer][:, :length], self.values[layer][:, :length]
        return flat_k[step.read_index], flat_v[step.read_index]

    def advance(self, step: CacheStep) -> None:
        """Count the step's tokens as stored (after every layer has run)."""
        self.lengths = [old + new for old, new in zip(self.lengths, step.new_lengths)]
