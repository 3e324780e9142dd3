"""Ulysses sequence parallelism for attention (DeepSpeed-Ulysses' scheme, over
torch.distributed): each of the W ranks of a group holds a contiguous chunk of the tokens
(:mod:`mmfast.distributed.sequence`) with all H heads; one all-to-all turns that into all
tokens for H / W of the heads, attention runs over the whole sequence on those heads
(mmfast.ops.attention, any backend), and a second all-to-all turns the output back into
this rank's tokens with all heads.

Why Ulysses. Attention is independent across heads, so splitting heads is exact (no
online-softmax merging as in ring attention), any attention kernel runs unchanged on a
full sequence, and the sequence order is the single-process order, so causal masks,
windows and rotary tables apply as they are. Per attention call a rank sends and
receives (W - 1) / W of its q, k, v and output shards: about 4 B (n / W) H D elements,
falling as W grows; all-gathering K and V instead (ring attention's total) moves
2 B n H D (W - 1) / W per rank, which does not fall with W. The price: W must divide
the head count (and the K/V head count under GQA), so W <= H; heads are the unit of
work on a rank.

Layout: q, k, v are this rank's padded-layout shards [B, c, H, D] (H q heads, K/V heads
may be fewer: GQA), tokens made by :func:`mmfast.distributed.shard_sequence`. Joint
attention (SD3, FLUX: text and image tokens attended as one sequence) shards each
stream separately and concatenates the shards along tokens: ``seq_lens=(n_image, n_text)``
gives the streams' true lengths, the local tensor holds ``ceil(n_s / W)`` tokens of each,
and the attention sees the single-process sequence: stream 0's n_0 tokens, then stream
1's. Padding (when W does not divide n_s) is cut off before the attention and comes back
as zero output rows.

Communication: q, k, v travel in one all_to_all_single (one buffer; two calls when K/V
have fewer heads), the output in one more; the backward runs the two reversed. Both NCCL and gloo
(torch 2.x) implement all_to_all_single, so the gloo tests on CPU run the NCCL path's
code. Nothing reads a device value back to the host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mmfast.distributed.collectives import all_to_all, resolve_group
from mmfast.distributed.sequence import shard_length
from mmfast.ops.attention import attention


def _stream_lengths(seq_lens, local_tokens: int, world: int) -> tuple[list[int], list[int]]:
    """(true lengths, local chunk lengths) of the streams concatenated in q's tokens."""
    if seq_lens is None:
        return [local_tokens * world], [local_tokens]
    lens = [seq_lens] if isinstance(seq_lens, int) and not isinstance(seq_lens, bool) else seq_lens
    if not isinstance(lens, (list, tuple)) or not lens or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in lens):
        raise ValueError(f"seq_lens: expected an int >= 0 or a non-empty tuple of them, got {seq_lens!r}")
    chunks = [shard_length(n, world) for n in lens]
    if sum(chunks) != local_tokens:
        raise ValueError(f"seq_lens: streams of {list(lens)} tokens are held as {chunks} tokens per rank over "
                         f"{world} ranks ({sum(chunks)} in all), but q has {local_tokens} local tokens")
    return list(lens), chunks


def _check(q: Tensor, k: Tensor, v: Tensor, world: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected this rank's shard [B, T_local, H, D], got shape {tuple(t.shape)}")
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"k, v: expected the same batch and tokens as q {tuple(q.shape[:2])} (self or joint "
                         f"attention over one sharded sequence), got {tuple(k.shape[:2])} and {tuple(v.shape[:2])}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v: expected as many heads as k ({k.shape[2]}), got {v.shape[2]}")
    for name, heads in (("q", q.shape[2]), ("k", k.shape[2])):
        if heads % world:
            raise ValueError(f"group: a world size of {world} does not divide the {heads} heads of {name}; "
                             "Ulysses gives each rank heads / world_size of the heads")


def _to_heads(tensors: list[Tensor], group, world: int, lens: list[int], chunks: list[int]) -> Tensor:
    """N shards [B, c, H, D] -> [N, B, sum(lens), H / W, D]: every stream's real tokens in
    sequence order, this rank's heads."""
    b, c, h, d = tensors[0].shape
    n = len(tensors)
    # One buffer for all N, head block r first for rank r: one copy of each shard.
    send = tensors[0].new_empty(world, n, b, c, h // world, d)
    for i, t in enumerate(tensors):
        send[:, i] = t.view(b, c, world, h // world, d).permute(2, 0, 1, 3, 4)
    recv = all_to_all(send, group)  # [W, N, B, c, H/W, D]; recv[r] = rank r's tokens
    parts, start = [], 0
    for length, chunk in zip(lens, chunks):
        part = recv[:, :, :, start:start + chunk].permute(1, 2, 0, 3, 4, 5)
        parts.append(part.reshape(n, b, world * chunk, h // world, d)[:, :, :length])
        start += chunk
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _to_tokens(out: Tensor, group, world: int, lens: list[int], chunks: list[int]) -> Tensor:
    """[B, sum(lens), H / W, D] -> this rank's [B, c, H, D] (padding rows zero)."""
    b, _, h, d = out.shape
    parts, start = [], 0
    for length, chunk in zip(lens, chunks):
        part = F.pad(out[:, start:start + length], (0, 0, 0, 0, 0, world * chunk - length))
        parts.append(part.view(b, world, chunk, h, d))
        start += length
    x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    recv = all_to_all(x.transpose(0, 1), group)  # [W, B, c, H/W, D]; recv[r] = head block r
    return recv.permute(1, 2, 0, 3, 4).reshape(b, sum(chunks), world * h, d)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group=None, *, seq_lens=None, causal: bool = False,
                      window=(-1, -1), scale: float | None = None, rotary=None, backend: str | None = None) -> Tensor:
    """Attention over a sequence sharded across ``group`` (see the module docstring).

    ``q``, ``k``, ``v``: this rank's shards [B, c, H, D] (same tokens; K/V may have fewer
    heads), made by :func:`mmfast.distributed.shard_sequence` (one stream) or several
    streams' shards concatenated along tokens. ``seq_lens``: the true length of each
    stream (an int, or a tuple in the order of concatenation); None means one stream of
    ``c * W`` tokens with no padding. ``causal``, ``window``, ``scale``, ``rotary`` (tables
    for the ``sum(seq_lens)`` tokens of the whole sequence, in sequence order) and
    ``backend`` are those of :func:`mmfast.ops.attention`. Returns this rank's output shard
    [B, c, H, D], zero on padding tokens; differentiable in q, k, v (exact gradients for
    the shards: the backward runs the reversed exchanges).

    ``group``: a torch.distributed process group (None: the default group) whose world
    size divides the head counts (a ValueError naming ``group`` otherwise).

    Example (every rank of a group of 2; n = 9 tokens, so c = 5 and rank 1 holds one pad)::

        >>> x = torch.randn(1, 9, 4, 64)                    # the same on every rank
        >>> q = mmfast.distributed.shard_sequence(x)        # [1, 5, 4, 64]
        >>> out = mmfast.distributed.ulysses_attention(q, q, q, seq_lens=9)
        >>> full = mmfast.distributed.gather_sequence(out, 9)  # == attention(x, x, x)
    """
    group = resolve_group(group)
    world = dist.get_world_size(group)
    _check(q, k, v, world)
    lens, chunks = _stream_lengths(seq_lens, q.shape[1], world)
    if q.shape == k.shape and q.dtype == k.dtype == v.dtype:
        q_full, k_full, v_full = _to_heads([q, k, v], group, world, lens, chunks).unbind(0)
    else:  # GQA / MQA: K/V have fewer heads
        q_full = _to_heads([q], group, world, lens, chunks)[0]
        k_full, v_full = _to_heads([k, v], group, world, lens, chunks).unbind(0)
    out = attention(q_full, k_full, v_full, causal=causal, window=window, scale=scale, rotary=rotary,
                    backend=backend)
    return _to_tokens(out, group, world, lens, chunks)
