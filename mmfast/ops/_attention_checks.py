"""Argument checks shared by the attention ops (attention, cross_attention): each raises
TypeError / ValueError naming the argument. Only ``check_cu_values`` reads the device
(one sync); callers run it when they sync anyway or under ``MMFAST_DEBUG_CHECKS=1``."""

from __future__ import annotations

import os

import torch
from torch import Tensor


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
        raise ValueError(f"max_seqlen for {name}: {max_seqlen} is less than the longest segment {longest}")
    return longest


def check_max_seqlen(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name}: expected None or an int >= 0, got {value!r}")
