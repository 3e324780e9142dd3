"""Self-attention over the pixels of a feature map, as in the mid-block of a VAE
(diffusers ``Attention`` built with ``norm_num_groups`` and ``residual_connection=True``,
run by ``AttnProcessor2_0``):

    h = GroupNorm(x)                         x: [B, C, H, W]
    tokens = h as [B, H*W, C]
    y = x + to_out(attention(to_q(tokens), to_k(tokens), to_v(tokens)))

The GroupNorm runs on mmfast's kernel on the 4-D map, so a channels_last input needs no
copy to become tokens ([B, H, W, C] is already [B, H*W, C]), and the output comes back in
the input's memory format. Attention goes through ``mmfast.ops.attention``'s dispatch: SD's
VAE has one head of 512 channels, past the Triton kernel's head dims, which dispatch
gives to SDPA.

``spatial_attention_forward`` runs on this module or, through ``mmfast.patch``, on a
diffusers ``Attention`` instance of that configuration (same attribute names).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfast.nn.diffusion_attention import split_heads
from mmfast.ops.attention import attention
from mmfast.ops.group_norm import group_norm


def fusable(attn) -> bool:
    """Whether a diffusers ``Attention`` is the plain spatial self-attention handled here:
    an affine GroupNorm in front, no spatial norm, no q/k norms, no cross-attention."""
    norm = getattr(attn, "group_norm", None)
    return (isinstance(norm, nn.GroupNorm) and norm.affine
            and getattr(attn, "spatial_norm", None) is None
            and getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None
            and not getattr(attn, "is_cross_attention", False)
            and not getattr(attn, "only_cross_attention", False)
            and getattr(attn, "add_q_proj", None) is None)


def spatial_attention_forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                              attention_mask: Tensor | None = None, temb: Tensor | None = None,
                              **kwargs) -> Tensor:
    """diffusers ``AttnProcessor2_0`` on a VAE-style ``Attention`` (see :func:`fusable`)."""
    if encoder_hidden_states is not None or attention_mask is not None:
        raise ValueError("encoder_hidden_states/attention_mask: spatial self-attention takes neither")
    if hidden_states.dim() != 4:
        raise ValueError(f"hidden_states: expected a feature map [B, C, H, W], got shape {tuple(hidden_states.shape)}")
    batch, channels, height, width = hidden_states.shape
    norm = self.group_norm
    tokens = group_norm(hidden_states, norm.num_groups, norm.weight, norm.bias, norm.eps)
    tokens = tokens.flatten(2).transpose(1, 2)  # [B, H*W, C]; a view of a channels_last map
    query, key, value = (split_heads(proj(tokens), batch, self.heads) for proj in (self.to_q, self.to_k, self.to_v))
    out = self.to_out[1](self.to_out[0](attention(query, key, value).flatten(-2)))
    out = out.transpose(1, 2).view(batch, channels, height, width)  # a channels_last view
    if self.residual_connection:
        out = hidden_states + out  # takes the layout of hidden_states, its first operand
    elif not hidden_states.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous()
    if self.rescale_output_factor != 1.0:
        out = out / self.rescale_output_factor
    return out


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block's attention with diffusers ``Attention``'s parameter names
    (``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``; state_dict compatible)."""

    def __init__(self, channels: int, heads: int = 1, groups: int = 32, eps: float = 1e-6, bias: bool = True,
                 out_bias: bool = True, residual_connection: bool = True, rescale_output_factor: float = 1.0,
                 dropout: float = 0.0):
        super().__init__()
        if channels % heads:
            raise ValueError(f"heads: {heads} does not divide channels {channels}")
        self.heads = heads
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)
        self.to_q = nn.Linear(channels, channels, bias=bias)
        self.to_k = nn.Linear(channels, channels, bias=bias)
        self.to_v = nn.Linear(channels, channels, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels, bias=out_bias), nn.Dropout(dropout)])

    @classmethod
    def like(cls, attn) -> "SpatialSelfAttention":
        """One with the configuration of diffusers ``Attention`` ``attn`` (one that
        :func:`fusable` accepts); weights not copied."""
        channels = attn.to_q.in_features
        if attn.to_q.out_features != channels or attn.to_out[0].out_features != channels:
            raise ValueError("attn: spatial self-attention keeps the channel count (inner dim == query dim)")
        return cls(channels, heads=attn.heads, groups=attn.group_norm.num_groups, eps=attn.group_norm.eps,
                   bias=attn.to_q.bias is not None, out_bias=attn.to_out[0].bias is not None,
                   residual_connection=attn.residual_connection, rescale_output_factor=attn.rescale_output_factor,
                   dropout=attn.to_out[1].p)

    forward = spatial_attention_forward


__all__ = ["SpatialSelfAttention", "fusable", "spatial_attention_forward"]
