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

Decoding (one token per sequence and step) has a static path, :meth:`KVCache.start_decoding`:
the lengths move to a device tensor, and each step's plan is built on the device from it,
with shapes that depend only on (batch, capacity). Attention reads the buffers in place as
one packed stream of all ``batch * capacity`` slots, cut into 2B segments: sequence b's
valid keys ``[b * capacity, b * capacity + length_b)`` with its one query, then the rest of
its row ``[.., (b + 1) * capacity)`` with no query (``cu_seqlens_q`` = [0, 1, 1, 2, 2, ..]),
which the kernels skip; with one query per sequence this is :func:`mmfast.ops.cross_attention`
(keys split over programs, flash-decoding style). No gather, no host sync, nothing the host
must plan: a decode step is capturable in a CUDA graph (:mod:`mmfast.models.decode_graph`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from mmfast.ops.attention import attention
from mmfast.ops.cross_attention import cross_attention


@dataclass
class CacheStep:
    """Index plumbing of one forward step, shared by every layer."""
    write_index: Tensor              # [sum(new)] flat slots (b * capacity + position) of the new tokens
    read_index: Optional[Tensor]     # [sum(total)] flat slots to gather, None on the padded path
    cu_seqlens_k: Optional[Tensor]   # int32 [B+1] over the gathered keys, None on the padded path
    max_seqlen_k: int
    total_length: Optional[int]      # the common length on the padded path
    new_lengths: tuple[int, ...]
    cu_seqlens_q: Optional[Tensor] = None  # int32 [2B+1] on the static decode path (see the module docstring)


class KVCache:
    """K/V buffers for ``num_layers`` layers of ``batch`` sequences, ``capacity`` tokens each."""

    def __init__(self, num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str | None = None):
        shape = (batch, capacity, num_kv_heads, head_dim)
        # Zeroed, not empty: the static decode path hands whole buffers to attention, and a
        # backend that masks probabilities rather than loads (torch, sdpa) multiplies the
        # unused slots by 0, which must not meet NaN garbage.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch, self.capacity = batch, capacity
        self.lengths = [0] * batch
        self.device_lengths: Optional[Tensor] = None  # long [B]: the lengths on the static decode path
        self.decoding = False  # on the static decode path (since start_decoding)
        self.decode_steps = 0  # static steps planned since start_decoding (host count, for the capacity check)

    @property
    def device(self) -> torch.device | None:
        return self.keys[0].device if self.keys else None

    @property
    def dtype(self) -> torch.dtype | None:
        return self.keys[0].dtype if self.keys else None

    def reset(self) -> None:
        """Empty, for a new batch of prompts (the buffers are kept: a captured graph reads them)."""
        self.lengths = [0] * self.batch
        self.decoding, self.decode_steps = False, 0

    def start_decoding(self) -> None:
        """Switch to the static decode path: every later step appends one token per
        sequence, planned on the device. The lengths tensor is created once and then
        overwritten in place (one host-to-device copy), so a captured graph keeps reading it."""
        lengths = torch.tensor(self.lengths, dtype=torch.long)
        if self.device_lengths is None:
            self.device_lengths = lengths.to(self.device)
            rows = torch.arange(self.batch, device=self.device)
            self._row_starts = rows * self.capacity  # each sequence's first slot
            ones = (rows + 1).to(torch.int32).repeat_interleave(2)
            self._decode_cu_q = torch.cat([ones.new_zeros(1), ones])  # [0, 1, 1, 2, 2, .., B, B]
        else:
            self.device_lengths.copy_(lengths)
        self.decoding, self.decode_steps = True, 0

    def plan(self, new_lengths: Sequence[int]) -> CacheStep:
        new_lengths = tuple(int(n) for n in new_lengths)
        if len(new_lengths) != self.batch:
            raise ValueError(f"new_lengths: expected {self.batch} entries (the batch), got {len(new_lengths)}")
        if self.decoding:
            return self._decode_plan(new_lengths)
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

    def _decode_plan(self, new_lengths: tuple[int, ...]) -> CacheStep:
        """The static step: built from ``device_lengths`` by device ops of fixed shapes."""
        if set(new_lengths) != {1}:
            raise ValueError(f"new_lengths: the static decode path appends one token per sequence, got {new_lengths}")
        if max(self.lengths) + self.decode_steps + 1 > self.capacity:
            raise ValueError(f"KVCache: {max(self.lengths) + self.decode_steps + 1} tokens exceed "
                             f"the capacity {self.capacity}")
        self.decode_steps += 1
        write = self._row_starts + self.device_lengths
        bounds = torch.stack([self._row_starts, write + 1], dim=1).flatten()  # row start, end of its valid keys
        cu_k = torch.cat([bounds, bounds.new_full((1,), self.batch * self.capacity)]).to(torch.int32)
        return CacheStep(write, None, cu_k, self.capacity, None, new_lengths, self._decode_cu_q)

    def attend(self, layer: int, step: CacheStep, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
               max_seqlen: int, dropout_p: float = 0.0) -> Tensor:
        """Causal attention of the step's packed queries q [sum(new), Hq, D] over everything
        cached for their sequences, after storing k, v [sum(new), Hk, D] for ``layer``."""
        keys, values = self.update(layer, step, k, v)
        if step.cu_seqlens_q is not None:
            # Static decode: the whole buffer, 2B segments. One query per sequence sees all of
            # its keys (causal adds nothing), which is cross-attention: its kernels split the
            # keys over programs (flash-decoding), where attention's would give one program
            # per sequence and head.
            return cross_attention(q, keys, values, cu_seqlens_q=step.cu_seqlens_q, cu_seqlens_k=step.cu_seqlens_k,
                                   max_seqlen_q=1, max_seqlen_k=step.max_seqlen_k, dropout_p=dropout_p)
        if step.read_index is None:  # equal lengths: padded views of the cache
            batch = keys.shape[0]
            return attention(q.view(batch, -1, *q.shape[1:]), keys, values, causal=True,
                             dropout_p=dropout_p).flatten(0, 1)
        return attention(q, keys, values, cu_seqlens_q=cu_seqlens, cu_seqlens_k=step.cu_seqlens_k,
                         max_seqlen_q=max_seqlen, max_seqlen_k=step.max_seqlen_k, causal=True, dropout_p=dropout_p)

    def update(self, layer: int, step: CacheStep, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the step's packed k, v [sum(new), Hk, D] for ``layer``; return the keys
        and values attention reads: padded [B, length, Hk, D] or packed [sum(total), Hk, D]."""
        flat_k = self.keys[layer].view(-1, *k.shape[1:])
        flat_v = self.values[layer].view(-1, *v.shape[1:])
        flat_k.index_copy_(0, step.write_index, k.to(flat_k.dtype))
        flat_v.index_copy_(0, step.write_index, v.to(flat_v.dtype))
        if step.cu_seqlens_q is not None:  # static decode: attention reads the buffers in place
            return flat_k, flat_v
        if step.read_index is None:
            length = step.total_length
            return self.keys[layer][:, :length], self.values[layer][:, :length]
        return flat_k[step.read_index], flat_v[step.read_index]

    def advance(self, step: CacheStep) -> None:
        """Count the step's tokens as stored (after every layer has run). On the static
        path the device lengths grow in place; the host list keeps the prompt lengths."""
        if step.cu_seqlens_q is not None:
            self.device_lengths.add_(1)
            return
        self.lengths = [old + new for old, new in zip(self.lengths, step.new_lengths)]
