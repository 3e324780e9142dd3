"""SDPA segment by segment, for the sdpa backends of attention and cross_attention where
the segment lengths can be read on the host for free (CPU tensors).

The general sdpa path (one SDPA call under a dense block-diagonal mask, with non-finite
keys and values contained by :mod:`mmfast.ops._sdpa_contained`) costs a [Tq, Tk] mask
and about fifteen extra ops per call, and computes every query against every key. Here
the segments are grouped into *runs*: consecutive segments with the same query and key
lengths whose keys start at a constant stride, each run one batched SDPA call over views
of q, k, v (no copy). Batch 1, a padded batch, equal windows (Qwen2.5-VL's vision tower)
and the decode step over a KV cache's buffers (one query per sequence) are one run each;
transformers loops over the segments one by one.

Within a segment, query i sits at key position ``i + lk - lq`` (bottom-right alignment) and
sees the keys of ``window``; whenever ``lq <= lk`` that includes its own aligned key, so no
query sees nothing. The plan (:func:`plan_runs`) is None, and the caller takes its
general path, where this would not be exact or not cheaper:

- a segment with more queries than keys under a causal or windowed mask (its first
  queries see no key);
- a key or value that is not finite, under a mask inside a segment (SDPA would spread a
  NaN score past the mask) or with gradients to compute (SDPA's backward multiplies a
  NaN value by the zero gradient of an unused output): the general path keeps it with the
  queries that see it (the check is one float32 sum of k and v, only in those cases);
- many runs over a small batch, where one masked call is cheaper than a call per run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Above this many runs, a batch whose dense [Tq, Tk] mask is at most MASKED_MAX_SCORES
# entries goes to the general (one masked call) path instead.
MAX_RUNS_BEFORE_MASK = 32
MASKED_MAX_SCORES = 1 << 22


@dataclass(frozen=True)
class Run:
    """``count`` segments of ``len_q`` queries from row ``start_q`` on (consecutive) and
    ``len_k`` keys each, the first from row ``start_k``, the next ``step_k`` rows further."""
    start_q: int
    start_k: int
    count: int
    len_q: int
    len_k: int
    step_k: int


def _segments(cu_q: list[int], cu_k: list[int]):
    for b in range(len(cu_q) - 1):
        yield cu_q[b], cu_q[b + 1] - cu_q[b], cu_k[b], cu_k[b + 1] - cu_k[b]


def runs_of(cu_q: list[int], cu_k: list[int]) -> list[Run]:
    """The runs of packed segments (host lists of cu_seqlens); segments without queries
    produce no output and are left out."""
    runs: list[Run] = []
    for start_q, len_q, start_k, len_k in _segments(cu_q, cu_k):
        if len_q == 0:
            continue
        if runs:
            last = runs[-1]
            step = start_k - last.start_k
            if (last.len_q, last.len_k) == (len_q, len_k) and start_q == last.start_q + last.count * len_q \
                    and (last.count == 1 or step == last.step_k * last.count) and step >= 0:
                runs[-1] = Run(last.start_q, last.start_k, last.count + 1, len_q, len_k,
                               step if last.count == 1 else last.step_k)
                continue
        runs.append(Run(start_q, start_k, 1, len_q, len_k, len_k))
    return runs


def _finite(*tensors: Tensor) -> bool:
    """Whether every element is finite: a float32 sum is non-finite when any element is
    (an overflow only sends an all-finite call to the general path)."""
    total = sum(t.sum(dtype=torch.float32) for t in tensors)
    return bool(torch.isfinite(total))


def _needs_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def plan_runs(runs: list[Run], tokens_q: int, tokens_k: int, window: tuple[int, int], q: Tensor, k: Tensor,
              v: Tensor) -> list[Run] | None:
    """``runs`` when the segment path is exact and worth it here, else None (see the module
    docstring)."""
    masked = window != (-1, -1)
    if masked and any(r.len_q > r.len_k > 0 for r in runs):
        return None
    if len(runs) > MAX_RUNS_BEFORE_MASK and tokens_q * tokens_k <= MASKED_MAX_SCORES:
        return None
    mask_inside = masked and any(r.len_k > 0 and (r.len_q > 1 or window[0] >= 0) for r in runs)
    if (mask_inside or _needs_grad(q, k, v)) and not _finite(k, v):
        return None
    return runs


def _rows(t: Tensor, start: int, count: int, length: int, step: int) -> Tensor:
    """[count, H, length, D]: ``count`` blocks of ``length`` rows of t [T, H, D], ``step``
    rows apart, as a view."""
    if count == 1 or step == length:
        block = t.narrow(0, start, count * length).unflatten(0, (count, length))
    else:
        base = t.narrow(0, start, step * (count - 1) + length)
        s0, s1, s2 = base.stride()
        block = base.as_strided((count, length, *base.shape[1:]), (step * s0, s0, s1, s2), base.storage_offset())
    return block.transpose(1, 2)


def _window_mask(len_q: int, len_k: int, window: tuple[int, int], device) -> Tensor | None:
    """Boolean [len_q, len_k] (bottom-right aligned window), or None when every query sees
    every key (no window, or one query under a causal mask)."""
    left, right = window
    if window == (-1, -1) or (len_q == 1 and left < 0 and right >= 0):
        return None
    diag = torch.arange(len_q, device=device)[:, None] + (len_k - len_q)
    keys = torch.arange(len_k, device=device)[None, :]
    mask = keys <= diag + right if right >= 0 else torch.ones((), dtype=torch.bool, device=device)
    return mask & (keys >= diag - left) if left >= 0 else mask


def _sdpa(qh: Tensor, kh: Tensor, vh: Tensor, window: tuple[int, int], scale: float, dropout_p: float) -> Tensor:
    len_q, len_k = qh.shape[-2], kh.shape[-2]
    gqa = qh.shape[-3] != kh.shape[-3]
    if window == (-1, -1):
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale, dropout_p=dropout_p, enable_gqa=gqa)
    if window == (-1, 0) and len_q == len_k and len_q > 1:
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, dropout_p=dropout_p,
                                              enable_gqa=gqa)
    mask = _window_mask(len_q, len_k, window, qh.device)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, dropout_p=dropout_p,
                                          enable_gqa=gqa)


def sdpa_runs(q: Tensor, k: Tensor, v: Tensor, runs: list[Run], window: tuple[int, int], scale: float,
              dropout_p: float = 0.0) -> Tensor:
    """Attention of packed q [Tq, Hq, D] over k, v [Tk, Hk, D] (Hk dividing Hq), one SDPA
    call per run; returns [Tq, Hq, D]. Rows of segments without keys get 0."""
    outs = []
    for r in runs:
        if r.len_k == 0:  # no keys: attention 0
            outs.append(q.new_zeros((r.count * r.len_q, *q.shape[1:])))
            continue
        qh = _rows(q, r.start_q, r.count, r.len_q, r.len_q)
        kh = _rows(k, r.start_k, r.count, r.len_k, r.step_k)
        vh = _rows(v, r.start_k, r.count, r.len_k, r.step_k)
        outs.append(_sdpa(qh, kh, vh, window, scale, dropout_p).transpose(1, 2).flatten(0, 1))
    if all(r.len_k == 0 for r in runs):  # no keys at all: zeros that keep q in the graph
        return q * 0
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def sdpa_padded(q: Tensor, k: Tensor, v: Tensor, window: tuple[int, int], scale: float,
                dropout_p: float = 0.0) -> Tensor:
    """Padded q [B, Tq, Hq, D] over k, v [B, Tk, Hk, D]; returns [B, Tq, Hq, D]."""
    return _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window, scale, dropout_p).transpose(1, 2)


def attend_on_host(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
                   window: tuple[int, int], scale: float, dropout_p: float = 0.0) -> Tensor | None:
    """Attention of q over k, v (packed with host-readable cu_seqlens, or padded) by the
    segment path; None where the caller's general path must run instead."""
    if cu_seqlens_q is None:
        batch, len_q, len_k = q.shape[0], q.shape[1], k.shape[1]
        if window != (-1, -1) and len_q > len_k > 0:
            return None
        mask_inside = window != (-1, -1) and len_k > 0 and (len_q > 1 or window[0] >= 0)
        if (mask_inside or _needs_grad(q, k, v)) and not _finite(k, v):
            return None
        if len_k == 0 or q.numel() == 0:
            return q * 0
        return sdpa_padded(q, k, v, window, scale, dropout_p)
    runs = plan_runs(runs_of(cu_seqlens_q.tolist(), cu_seqlens_k.tolist()), q.shape[0], k.shape[0], window, q, k, v)
    return None if runs is None else sdpa_runs(q, k, v, runs, window, scale, dropout_p)
