"""SDPA under a boolean visibility mask, with non-finite keys and values kept inside the
queries that see them (shared by attention and cross_attention's ``sdpa`` backends).

SDPA turns a boolean mask into an additive one (0 / -inf) and multiplies probabilities
by every value: a NaN key gives NaN + -inf = NaN for every query, a NaN value 0 * NaN =
NaN, so one bad token of a packed batch poisoned every other sequence. Here SDPA runs on
keys and values with their non-finite entries zeroed, and the queries that see a
non-finite key or value (of their own head) are set to NaN, as the torch reference gives
them. Queries that see no key at all get 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sdpa_contained(qh: Tensor, kh: Tensor, vh: Tensor, visible: Tensor, scale, dropout_p: float = 0.0) -> Tensor:
    """SDPA of heads-first ``qh`` [..., H, Tq, D], ``kh``, ``vh`` [..., H, Tk, D] (K/V heads
    already repeated) under ``visible`` [..., Tq, Tk] (broadcast over heads)."""
    finite_k, finite_v = torch.isfinite(kh), torch.isfinite(vh)
    bad = ~(finite_k.all(-1) & finite_v.all(-1))  # [..., H, Tk]: a key or value that would leak
    kh = torch.where(finite_k, kh, 0.0)
    vh = torch.where(finite_v, vh, 0.0)
    # Counts of bad keys each query sees (non-negative: any positive count stays positive).
    sees_bad = (visible.to(qh.dtype) @ bad.to(qh.dtype).unsqueeze(-1)) > 0  # [..., H, Tq, 1]
    sees_any = visible.any(-1, keepdim=True)
    # SDPA gives NaN for a fully masked row: let it see every key, then zero it.
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=visible | ~sees_any, scale=scale,
                                         dropout_p=dropout_p)
    out = out * sees_any
    return torch.where(sees_bad, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)
