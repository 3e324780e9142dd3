"""Attention backends over optional third-party libraries: flash-attn 2
(``flash_attn_varlen_func`` / ``flash_attn_func``), flash-attn 4 (``flash_attn.cute``) and
xformers (``memory_efficient_attention``).

None of them is needed, and none is imported before a call runs on it (the library is
looked up without importing it when dispatch asks). Each ``run_*`` takes the attention
op's backend arguments (see mmfast/ops/attention.py, where they are registered with what
they support) and returns (out, None): none of them differentiates its log-sum-exp, so
they do not offer ``return_lse``.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor


def _flash_window(window_left: int, window_right: int) -> tuple[bool, int, int]:
    """(causal, left, right) for flash-attn: its causal flag where the window is plain causal."""
    if window_left < 0 and window_right == 0:
        return True, -1, -1
    return False, window_left, window_right


def _no_keys(q: Tensor, k: Tensor):
    # Queries over no key at all see nothing: out = 0 (q * 0 keeps the graph: zero grads).
    return (q * 0, None) if k.shape[-3] == 0 or q.shape[-3] == 0 else None


# ---- flash-attn 2 ------------------------------------------------------------------


def run_flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   window_left, window_right, scale, dropout_p=0.0, seed=None):
    """``dropout_p``: flash-attn's own dropout, from torch's default CUDA generator
    (``seed`` is unused: its mask is not mmfast's)."""
    empty = _no_keys(q, k)
    if empty is not None:
        return empty
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    causal, left, right = _flash_window(window_left, window_right)
    # deterministic=True: the op promises a deterministic backward on every backend.
    options = dict(softmax_scale=scale, causal=causal, window_size=(left, right), deterministic=True,
                   dropout_p=dropout_p)
    if cu_seqlens_q is None:
        return flash_attn_func(q, k, v, **options), None
    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options)
    return out, None


# ---- flash-attn 4 (CuTe DSL) --------------------------------------------------------


def run_flash_attn_cute(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        window_left, window_right, scale):
    empty = _no_keys(q, k)
    if empty is not None:
        return empty
    interface = importlib.import_module("flash_attn.cute")

    causal, left, right = _flash_window(window_left, window_right)
    window = (None if left < 0 else left, None if right < 0 else right)
    options = dict(softmax_scale=scale, causal=causal, window_size=window, deterministic=True)
    if cu_seqlens_q is None:
        result = interface.flash_attn_func(q, k, v, **options)
    else:
        result = interface.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, **options,
        )
    return (result[0] if isinstance(result, tuple) else result), None


# ---- xformers ----------------------------------------------------------------------


def _grouped(t: Tensor, heads: int) -> Tensor:
    """[B, T, Hk, D] -> [B, T, Hk, heads / Hk, D]: xformers' GQA layout (a stride-0 view)."""
    kv_heads = t.shape[2]
    return t.unsqueeze(3).expand(*t.shape[:3], heads // kv_heads, t.shape[-1])


def run_xformers(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 window_left, window_right, scale):
    """Non-causal, no window (the backend's declared support). Packed segments go through
    a BlockDiagonalMask, which is built from Python lists of lengths: one device sync."""
    empty = _no_keys(q, k)
    if empty is not None:
        return empty
    from xformers.ops import fmha, memory_efficient_attention

    packed = cu_seqlens_q is not None
    if packed:  # one batch entry holding every segment
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads != heads:
        q = q.unflatten(2, (kv_heads, heads // kv_heads))
        k, v = _grouped(k, heads), _grouped(v, heads)
    bias = None
    if packed:
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(
            q_seqlen=cu_seqlens_q.diff().tolist(), kv_seqlen=cu_seqlens_k.diff().tolist()
        )
    out = memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)
    if kv_heads != heads:
        out = out.flatten(2, 3)
    if packed:
        out = out.squeeze(0)
        # A query whose segment has no key sees nothing: out = 0, whatever xformers made of it.
        lengths_q = cu_seqlens_q.diff()
        has_keys = (cu_seqlens_k.diff() > 0).repeat_interleave(lengths_q, output_size=out.shape[0])
        out = torch.where(has_keys[:, None, None], out, out.new_zeros(()))
    return out, None
