"""Splitting a sequence across the ranks of a group, and gathering it back.

Rank r of a group of W holds tokens ``r * c .. (r + 1) * c`` of a sequence of n tokens,
with ``c = shard_length(n, W) = ceil(n / W)``: contiguous chunks in rank order. When W does
not divide n the sequence is padded with ``W * c - n`` zero tokens at its end, held by the
last rank(s) (n = 9, W = 4: chunks of 3, the last rank holds padding only).
:func:`mmfast.distributed.ulysses_attention` is told
the true lengths (``seq_lens``) and keeps the padding out of the attention; per-token
layers compute on it harmlessly, and :func:`gather_sequence` drops it.

    >>> x_local = shard_sequence(x, group)                # [B, n, C] -> [B, c, C]
    >>> y = gather_sequence(f(x_local), x.shape[1], group)  # [B, c, C] -> [B, n, C]

Gradients. ``shard_sequence`` of a replicated tensor passes back only this rank's chunk,
and ``gather_sequence`` passes back this rank's chunk of the gradient of its replicated
result: so when every rank computes the same loss from the gathered output, the gradient
each rank gets for a replicated tensor (the input, every parameter) is the share of its
own tokens, and the shares sum over the group (``all_reduce``, SUM) to the
single-process gradient.
"""

from __future__ import annotations

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mmfast.distributed.collectives import gather_replicated, resolve_group


def shard_length(length: int, world_size: int) -> int:
    """Tokens each rank holds of a sequence of ``length`` tokens split over ``world_size``."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length: expected an int >= 0, got {length!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    return -(-length // world_size)


def _check_dim(x: Tensor, dim: int) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: expected an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-d x, got {dim!r}")
    return dim % x.dim()


def shard_sequence(x: Tensor, group=None, dim: int = 1) -> Tensor:
    """This rank's chunk of ``x`` (the same full tensor on every rank) along ``dim``:
    ``shard_length(x.shape[dim], W)`` tokens, zero-padded at the end of the sequence."""
    dim = _check_dim(x, dim)
    group = resolve_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    length = x.shape[dim]
    chunk = shard_length(length, world)
    start = min(rank * chunk, length)
    local = x.narrow(dim, start, min(chunk, length - start))
    missing = chunk - local.shape[dim]
    if missing:
        pad = [0, 0] * (x.dim() - 1 - dim) + [0, missing]
        local = F.pad(local, pad)
    return local


def gather_sequence(x: Tensor, length: int, group=None, dim: int = 1) -> Tensor:
    """Every rank's chunk of a sequence (made by :func:`shard_sequence`) concatenated
    along ``dim`` and cut to its ``length`` tokens: the full tensor, on every rank.
    Gradient: this rank's chunk (see the module docstring)."""
    dim = _check_dim(x, dim)
    group = resolve_group(group)
    world = dist.get_world_size(group)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length: expected an int >= 0, got {length!r}")
    if shard_length(length, world) != x.shape[dim]:
        raise ValueError(f"length: a sequence of {length} tokens is held as {shard_length(length, world)} tokens "
                         f"per rank over {world} ranks, but x has {x.shape[dim]} along dim {dim}")
    full = gather_replicated(x.movedim(dim, 0), group)
    return full[:length].movedim(0, dim)
