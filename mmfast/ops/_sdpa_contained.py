"""Non-finite keys and values kept inside the queries that see them, for attention and
cross_attention (their ``sdpa`` backends and their torch references).

A packed batch computes every query against every key and masks afterwards, so one NaN
or Inf token reached every sequence: SDPA turns a boolean mask into an additive one and
a NaN score + -inf stays NaN; and ``probs @ v`` multiplies a masked-out probability (0)
by a NaN or Inf value, which gives NaN. Here:

- values: the product runs on values with their non-finite entries zeroed, and the
  queries that see a non-finite value get NaN (as ``0 * NaN`` would have given them, but
  only them; a query that sees an Inf value gets NaN rather than Inf);
- keys (SDPA only; the references mask scores with ``masked_fill``, which already keeps
  them in): zeroed likewise, and the queries that see a non-finite key get NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _sees_nonfinite(visible: Tensor, finite: Tensor, dtype: torch.dtype) -> Tensor:
    """[..., H, Tq, 1]: the query sees a token (``visible`` [..., Tq, Tk]) whose row of
    ``finite`` [..., H, Tk, D] is not all finite. A count of non-negative terms: any
    positive count stays positive, whatever the rounding."""
    return (visible.to(dtype) @ (~finite.all(-1)).to(dtype).unsqueeze(-1)) > 0


def _nan_where(condition: Tensor, out: Tensor) -> Tensor:
    return torch.where(condition, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)


def attend_values(probs: Tensor, vh: Tensor, visible: Tensor) -> Tensor:
    """``probs @ vh`` ([..., H, Tq, Tk] @ [..., H, Tk, D]) with non-finite values reaching
    only the queries that see them (``visible`` [..., Tq, Tk], broadcast over heads)."""
    finite = torch.isfinite(vh)
    out = probs @ torch.where(finite, vh, 0.0)
    return _nan_where(_sees_nonfinite(visible, finite, out.dtype), out)


def sdpa_contained(qh: Tensor, kh: Tensor, vh: Tensor, visible: Tensor, scale, dropout_p: float = 0.0) -> Tensor:
    """SDPA of heads-first ``qh`` [..., H, Tq, D], ``kh``, ``vh`` [..., H, Tk, D] (K/V heads
    already repeated) under ``visible`` [..., Tq, Tk]; queries that see no key get 0."""
    finite_k, finite_v = torch.isfinite(kh), torch.isfinite(vh)
    sees_bad = _sees_nonfinite(visible, finite_k & finite_v, qh.dtype)
    sees_any = visible.any(-1, keepdim=True)
    # SDPA gives NaN for a fully masked row: let it see every key, then zero it.
    out = F.scaled_dot_product_attention(qh, torch.where(finite_k, kh, 0.0), torch.where(finite_v, vh, 0.0),
                                         attn_mask=visible | ~sees_any, scale=scale, dropout_p=dropout_p)
    return _nan_where(sees_bad, out * sees_any)
