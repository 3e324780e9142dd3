"""Argument checks shared by the attention ops (attention, cross_attention): each raises
TypeError / ValueError naming the argument. Only ``check_cu_values`` reads the device
(one sync); callers run it for CPU tensors, when they sync anyway or under
``MMFAST_DEBUG_CHECKS=1``."""

from __future__ import annotations

import math
import os
from numbers import Real

import torch
from torch import Tensor

# The widest head any mmfast model has (a VAE mid-block: one head of 512 channels). Each
# backend declares the head dims it takes (Triton: up to 256); dispatch routes the rest.
MAX_HEAD_DIM = 512
# CPU cu_seqlens of at most this many entries are checked as a Python list.
HOST_CHECKED_ENTRIES = 256


def debug_checks() -> bool:
    return os.environ.get("MMFAST_DEBUG_CHECKS", "0") not in ("", "0")


def check_tensor(name: str, t, q: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if q is None:
        if t.dim() not in (3, 4):
            raise ValueError(f"{name}: expected [T, H, D] (packed) or [B, T, H, D] (padded), got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        return
    if t.dtype != q.dtype:
        raise TypeError(f"{name}: expected dtype {q.dtype} (that of q), got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (that of q), got {t.device}")
    if t.dim() != q.dim():
        raise ValueError(f"{name}: expected {q.dim()} dims like q, got shape {tuple(t.shape)}")


def check_cu_seqlens(name: str, cu, q: Tensor) -> None:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name}: expected an int32 Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype int32, got {cu.dtype}")
    if cu.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (that of q), got {cu.device}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name}: expected a 1-d tensor of B+1 >= 1 entries, got shape {tuple(cu.shape)}")


def check_cu_values(name: str, cu: Tensor, tokens: int, max_seqlen: int | None) -> int:
    """Value checks, in one device sync; returns the longest segment."""
    if cu.device.type == "cpu" and cu.numel() <= HOST_CHECKED_ENTRIES:
        # A few values: read them and check in Python (four tensor ops cost more).
        values = cu.tolist()
        lengths = [end - start for start, end in zip(values, values[1:])] or [0]
        first, last, shortest, longest = values[0], values[-1], min(lengths), max(lengths)
    else:
        lengths = cu.diff()
        if not lengths.numel():  # no segments
            lengths = cu.new_zeros(1)
        first, last, shortest, longest = torch.stack([cu[0], cu[-1], lengths.min(), lengths.max()]).tolist()
    if first != 0:
        raise ValueError(f"{name}: expected the first entry to be 0, got {first}")
    if shortest < 0:
        raise ValueError(f"{name}: expected non-decreasing entries, got {cu.tolist()}")
    if last != tokens:
        raise ValueError(f"{name}: expected the last entry to equal the token count {tokens}, got {last}")
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen_{name[-1]}: {max_seqlen} is less than the longest segment {longest} of {name}")
    return longest


def check_max_seqlen(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name}: expected None or an int >= 0, got {value!r}")


def check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> bool:
    """Tensors, layout and heads of q, k, v; returns whether the layout is packed."""
    check_tensor("q", q)
    # The usual call, k and v of q's dtype, device and rank, is told in three comparisons
    # (check_tensor reads q's properties again for each); check_tensor names what differs.
    dtype, device, dims = q.dtype, q.device, q.dim()
    for name, t in (("k", k), ("v", v)):
        if not (isinstance(t, Tensor) and t.dtype == dtype and t.device == device and t.dim() == dims):
            check_tensor(name, t, q)
    packed = dims == 3
    q_shape, k_shape = q.shape, k.shape
    if k_shape != v.shape:
        raise ValueError(f"v: expected shape {tuple(k_shape)} (that of k), got {tuple(v.shape)}")
    if packed != (cu_seqlens_q is not None) or packed != (cu_seqlens_k is not None):
        raise ValueError(
            "cu_seqlens_q, cu_seqlens_k: expected both for packed [T, H, D] inputs and neither "
            f"for padded [B, T, H, D] ones; q has shape {tuple(q_shape)}"
        )
    if not packed and (max_seqlen_q is not None or max_seqlen_k is not None):
        raise ValueError("max_seqlen_q, max_seqlen_k: only for the packed layout (with cu_seqlens)")
    if not packed and k_shape[0] != q_shape[0]:
        raise ValueError(f"k: expected batch size {q_shape[0]} (that of q), got {k_shape[0]}")
    head_dim = q_shape[-1]
    if k_shape[-1] != head_dim:
        raise ValueError(f"k: expected head dim {head_dim} (that of q), got {k_shape[-1]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim {head_dim} not supported (expected 1..{MAX_HEAD_DIM})")
    heads, kv_heads = q_shape[-2], k_shape[-2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k: expected a head count that divides q's {heads}, got {kv_heads}")
    return packed


def check_scale(scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale)):
        raise ValueError(f"scale: expected None or a finite number, got {scale!r}")


def check_lengths(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple[int, int]:
    """max_seqlen and cu_seqlens; returns (max_seqlen_q, max_seqlen_k): the given ones, or
    for packed inputs without them the longest segments (one sync), or the padded lengths."""
    check_max_seqlen("max_seqlen_q", max_seqlen_q)
    check_max_seqlen("max_seqlen_k", max_seqlen_k)
    if q.dim() != 3:
        return q.shape[1], k.shape[1]
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(
            f"cu_seqlens_k: expected {cu_seqlens_q.numel()} entries (B+1, like cu_seqlens_q), "
            f"got {cu_seqlens_k.numel()}"
        )
    # Value checks need the values on the host: always for CPU tensors (no sync to avoid),
    # else only when syncing anyway, or debugging. On a device the kernels clamp the values,
    # so bad ones cannot reach outside the tensors, and loop past a too-small max_seqlen.
    check_all = debug_checks() or (not torch.compiler.is_compiling() and q.is_cpu)
    if max_seqlen_q is None or check_all:
        max_seqlen_q = check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    if max_seqlen_k is None or check_all:
        max_seqlen_k = check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
    return max_seqlen_q, max_seqlen_k


def triton_head_dim(d: int) -> bool:
    """Head dims the Triton attention kernels tile (kernels/_head_dim.py): multiples of 8
    from 8 (padded to a 16- or 32-wide tile, as flash-attn 2 does), any from 32 (upper
    bounds are the backends')."""
    return d >= 32 or (d >= 8 and d % 8 == 0)
