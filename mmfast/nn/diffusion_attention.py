"""Attention of diffusion models (UNet self/cross-attention, SD3 joint attention) on
``mmfast.ops.attention``, with diffusers' ``Attention`` parameter names.

The forward functions take any object with diffusers' attribute names (``to_q``, ``to_k``,
``to_v``, ``to_out``, ``heads``, optional ``add_*_proj``, q/k norms, ...): this module's
:class:`Attention`, or a diffusers ``Attention`` through the processors in
``mmfast.integrations.diffusers.attention_processors``. q, k, v stay in the projections'
own [B, T, H, D] layout, which is mmfast's padded layout: no transpose before the kernel.

Key padding. ``keep`` [B, Tk] (True = attend) packs the kept keys of each sample and
runs the variable-length kernel. Checking a mask and gathering the kept keys read the
device twice (the mask's kind, the kept-key count): pass no mask when capturing a CUDA
graph.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from mmfast.nn.norm import RMSNorm
from mmfast.ops.attention import attention


def split_heads(t: Tensor, batch: int, heads: int) -> Tensor:
    """[B, T, H * D] -> [B, T, H, D] (a view)."""
    return t.view(batch, -1, heads, t.shape[-1] // heads)


def masked_attention(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None = None) -> Tensor:
    """Attention of [B, Tq, H, D] queries over [B, Tk, H, D] keys, only the keys where
    ``keep`` [B, Tk] holds when it is given (every sample must keep at least one)."""
    if keep is None:
        return attention(query, key, value)
    batch, tokens_q, heads, dim = query.shape
    kept = keep.sum(-1, dtype=torch.int32)
    cu_k = torch.nn.functional.pad(kept.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (batch + 1) * tokens_q, tokens_q, dtype=torch.int32, device=query.device)
    out = attention(query.reshape(-1, heads, dim), key[keep], value[keep], cu_seqlens_q=cu_q,
                    cu_seqlens_k=cu_k, max_seqlen_q=tokens_q, max_seqlen_k=key.shape[1])
    return out.view(batch, tokens_q, heads, dim)


# Additive masks at or below this are "masked": exp(-10000) underflows in every dtype.
MASKED_BIAS = -1e4


def key_padding(mask: Tensor, batch: int, keys: int) -> Tensor | None:
    """Boolean [B, Tk] keep-mask from a key-padding ``attention_mask`` ([B, Tk] or
    [B, 1, Tk]; boolean, True = attend, or additive, 0 = attend and <= -10000 = masked);
    None for a mask of another kind or one that masks every key of a sample. Reads the
    mask on the host (one sync)."""
    if mask.dim() == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.shape != (batch, keys):
        return None
    if mask.dtype == torch.bool:
        keep, soft = mask, torch.zeros((), dtype=torch.bool, device=mask.device)
    else:
        keep = mask == 0
        soft = ((mask != 0) & (mask > MASKED_BIAS)).any()
    soft, any_empty = torch.stack([soft, (~keep.any(-1)).any()]).tolist()
    return None if soft or any_empty else keep


def attention_forward(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                      keep: Tensor | None = None, temb: Tensor | None = None,
                      attend: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """diffusers ``AttnProcessor2_0`` semantics (self- or cross-attention) with a
    key-padding ``keep`` [B, Tk] instead of an additive mask. ``attend(q, k, v)``, when
    given (no ``keep``), takes the place of mmfast attention on the [B, T, H, D] heads
    (sequence parallelism: mmfast.distributed.ulysses_attention)."""
    residual = hidden_states
    if getattr(attn, "spatial_norm", None) is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    batch = hidden_states.shape[0]
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif getattr(attn, "norm_cross", None):
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    query, key, value = (split_heads(t, batch, attn.heads) for t in (query, key, value))
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)

    if attend is not None and keep is not None:
        raise ValueError("keep: a key-padding mask cannot go with attend")
    out = attend(query, key, value) if attend is not None else masked_attention(query, key, value, keep)
    out = attn.to_out[1](attn.to_out[0](out.flatten(-2)))  # projection, dropout
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channels, height, width)
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)


def joint_attention_forward(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                            attend: Callable[[Tensor, Tensor, Tensor], Tensor] = attention):
    """diffusers ``JointAttnProcessor2_0`` semantics (SD3 MM-DiT): image and text tokens
    projected separately, attended as one sequence, split again. ``attend(q, k, v)`` on
    the [B, T, H, D] heads: mmfast attention, or under sequence parallelism
    mmfast.distributed.ulysses_attention (image then text shards, as concatenated here)."""
    batch, tokens = hidden_states.shape[:2]
    query = split_heads(attn.to_q(hidden_states), batch, attn.heads)
    key = split_heads(attn.to_k(hidden_states), batch, attn.heads)
    value = split_heads(attn.to_v(hidden_states), batch, attn.heads)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    if encoder_hidden_states is not None:
        ctx_query = split_heads(attn.add_q_proj(encoder_hidden_states), batch, attn.heads)
        ctx_key = split_heads(attn.add_k_proj(encoder_hidden_states), batch, attn.heads)
        ctx_value = split_heads(attn.add_v_proj(encoder_hidden_states), batch, attn.heads)
        if getattr(attn, "norm_added_q", None) is not None:
            ctx_query = attn.norm_added_q(ctx_query)
        if getattr(attn, "norm_added_k", None) is not None:
            ctx_key = attn.norm_added_k(ctx_key)
        query = torch.cat([query, ctx_query], dim=1)
        key = torch.cat([key, ctx_key], dim=1)
        value = torch.cat([value, ctx_value], dim=1)

    out = attend(query, key, value).flatten(-2)
    hidden_states = attn.to_out[1](attn.to_out[0](out[:, :tokens]))
    if encoder_hidden_states is None:
        return hidden_states
    encoder_hidden_states = out[:, tokens:]
    if not attn.context_pre_only:
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


class Attention(nn.Module):
    """Multi-head attention with diffusers ``Attention``'s parameter names (state_dict
    compatible) for the configurations of SD1.5-family UNets, DiT and SD3: self- or
    cross-attention (``cross_attention_dim``), or joint attention with a text stream
    (``added_kv_proj_dim``; ``context_pre_only``: the text stream has no output projection).
    ``qk_norm="rms_norm"`` (SD3.5): a per-head RMSNorm with weight on q and k, and on the
    text stream's q and k (``norm_added_q`` / ``norm_added_k``) in joint attention."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 bias: bool = False, out_bias: bool = True, dropout: float = 0.0,
                 added_kv_proj_dim: int | None = None, context_pre_only: bool | None = None,
                 qk_norm: str | None = None, eps: float = 1e-6):
        super().__init__()
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm: expected None or 'rms_norm', got {qk_norm!r}")
        inner = heads * dim_head
        self.heads = heads
        self.context_pre_only = context_pre_only
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.joint = added_kv_proj_dim is not None
        if self.joint:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, inner, bias=True)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, inner, bias=True)
            self.add_q_proj = nn.Linear(added_kv_proj_dim, inner, bias=True)
            if not context_pre_only:
                self.to_add_out = nn.Linear(inner, query_dim, bias=out_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])
        if qk_norm is not None:
            self.norm_q, self.norm_k = RMSNorm(dim_head, eps), RMSNorm(dim_head, eps)
            if self.joint:
                self.norm_added_q, self.norm_added_k = RMSNorm(dim_head, eps), RMSNorm(dim_head, eps)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None):
        if self.joint:
            if attention_mask is not None:
                raise ValueError("attention_mask: joint attention takes none")
            return joint_attention_forward(self, hidden_states, encoder_hidden_states)
        keep = None
        if attention_mask is not None:
            source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            keep = key_padding(attention_mask, hidden_states.shape[0], source.shape[1])
            if keep is None:
                raise ValueError("attention_mask: expected key padding, [B, Tk] or [B, 1, Tk], boolean or "
                                 "0 / <= -10000, keeping at least one key per sample")
        return attention_forward(self, hidden_states, encoder_hidden_states, keep)
