"""The transformer block of SD1.5-family UNets (diffusers ``BasicTransformerBlock`` with
LayerNorms, inside ``Transformer2DModel``): self-attention, cross-attention to the text
tokens, GEGLU feed-forward, each pre-normed with a residual.

``transformer_2d_block_forward`` fuses each residual add into the LayerNorm that follows
it (``mmfast.ops.layer_norm(..., residual=)``) and runs attention on mmfast's kernels;
it runs on :class:`Transformer2DBlock` or, through ``mmfast.patch``, on a diffusers
``BasicTransformerBlock`` of that configuration (see :func:`fusable`).
"""

from __future__ import annotations

from torch import nn

from mmfast.nn.diffusion_attention import Attention
from mmfast.nn.feed_forward import FeedForward
from mmfast.ops.norm import layer_norm


def fusable(block) -> bool:
    """Whether a diffusers BasicTransformerBlock is of the plain LayerNorm kind."""
    return (getattr(block, "norm_type", None) == "layer_norm" and block.pos_embed is None
            and not hasattr(block, "fuser") and type(block.norm1) is nn.LayerNorm
            and type(block.norm3) is nn.LayerNorm
            and (block.attn2 is None or type(block.norm2) is nn.LayerNorm))


def _norm(norm: nn.LayerNorm, x, residual):
    return layer_norm(x, norm.weight, norm.bias, norm.eps, residual=residual)


def transformer_2d_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                                 encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                                 class_labels=None, added_cond_kwargs=None):
    """diffusers BasicTransformerBlock.forward (layer_norm type), residual adds fused."""
    kwargs = dict(cross_attention_kwargs or {})
    kwargs.pop("scale", None)
    if getattr(self, "_chunk_size", None) is not None:
        raise ValueError("feed-forward chunking: not supported by the mmfast block; undo the patch to use it")
    attn_out = self.attn1(layer_norm(hidden_states, self.norm1.weight, self.norm1.bias, self.norm1.eps),
                          encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                          attention_mask=attention_mask, **kwargs)
    if self.attn2 is not None:
        normed, hidden_states = _norm(self.norm2, attn_out, hidden_states)
        attn_out = self.attn2(normed, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=encoder_attention_mask, **kwargs)
    normed, hidden_states = _norm(self.norm3, attn_out, hidden_states)
    return self.ff(normed) + hidden_states


class Transformer2DBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` with ``norm_type="layer_norm"`` (state_dict
    compatible): the block of SD1.5/SD2 UNets. ``cross_attention_dim=None`` leaves out the
    cross-attention (and its norm2), as diffusers does."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, dropout: float = 0.0,
                 cross_attention_dim: int | None = None, activation_fn: str = "geglu",
                 attention_bias: bool = False, only_cross_attention: bool = False,
                 norm_elementwise_affine: bool = True, norm_eps: float = 1e-5, attention_out_bias: bool = True,
                 ff_inner_dim: int | None = None, ff_bias: bool = True):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(dim, num_attention_heads, attention_head_dim,
                               cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               bias=attention_bias, out_bias=attention_out_bias, dropout=dropout)
        self.norm2 = self.attn2 = None
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
            self.attn2 = Attention(dim, num_attention_heads, attention_head_dim, cross_attention_dim=cross_attention_dim,
                                   bias=attention_bias, out_bias=attention_out_bias, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn, inner_dim=ff_inner_dim, bias=ff_bias)

    forward = transformer_2d_block_forward
