"""DiT and SD3 MM-DiT blocks (adaLN-Zero) on mmfast ops, state_dict compatible with
diffusers' ``BasicTransformerBlock(norm_type="ada_norm_zero")`` (as in
``DiTTransformer2DModel``) and ``JointTransformerBlock`` (``SD3Transformer2DModel``, SD3
and SD3.5: q/k RMSNorms, dual attention).

Each modulation is one ``adaln_modulate`` pass and each gated residual one
``gated_residual`` pass; attention runs on mmfast's kernels. The forward functions also
run, through ``mmfast.patch``, on diffusers blocks of these configurations.
"""

from __future__ import annotations

from torch import nn

from mmfast.nn.adaptive_norm import (
    AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX, modulation_fusable)
from mmfast.nn.diffusion_attention import Attention
from mmfast.nn.feed_forward import FeedForward
from mmfast.ops.adaln import adaln_modulate, gated_residual


def dit_fusable(block) -> bool:
    """Whether a diffusers BasicTransformerBlock is DiT's adaLN-Zero self-attention block."""
    return (getattr(block, "norm_type", None) == "ada_norm_zero" and block.attn2 is None
            and block.pos_embed is None and not hasattr(block, "fuser")
            and modulation_fusable(block.norm1) and type(block.norm3) is nn.LayerNorm
            and not block.norm3.elementwise_affine)


def dit_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                      encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                      class_labels=None, added_cond_kwargs=None):
    """diffusers BasicTransformerBlock.forward for ``norm_type="ada_norm_zero"`` (DiT)."""
    if getattr(self, "_chunk_size", None) is not None:
        raise ValueError("feed-forward chunking: not supported by the mmfast block; undo the patch to use it")
    normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
        hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype)
    hidden_states = gated_residual(hidden_states, gate_msa, self.attn1(normed, attention_mask=attention_mask))
    normed = adaln_modulate(hidden_states, shift_mlp, scale_mlp, self.norm3.eps)
    return gated_residual(hidden_states, gate_mlp, self.ff(normed))


def mmdit_fusable(block) -> bool:
    """Whether a diffusers JointTransformerBlock is of the SD3 / SD3.5 kind: LayerNorms
    without affine under every modulation (dual attention or not; q/k norms are the
    attention's business)."""
    return (modulation_fusable(block.norm1) and modulation_fusable(block.norm1_context)
            and all(n is None or (type(n) is nn.LayerNorm and not n.elementwise_affine)
                    for n in (block.norm2, block.norm2_context)))


def mmdit_block_forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
    """diffusers JointTransformerBlock.forward (SD3, and SD3.5's dual attention: a second,
    image-only self-attention ``attn2`` with its own modulation and gate): returns
    (encoder_hidden_states, hidden_states), the former None for a context_pre_only block."""
    if getattr(self, "_chunk_size", None) is not None:
        raise ValueError("feed-forward chunking: not supported by the mmfast block; undo the patch to use it")
    joint_attention_kwargs = joint_attention_kwargs or {}
    if self.use_dual_attention:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp, normed2, gate_msa2 = self.norm1(hidden_states, emb=temb)
    else:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    if self.context_pre_only:
        normed_ctx = self.norm1_context(encoder_hidden_states, temb)
    else:
        normed_ctx, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb)
    attn_out, ctx_attn_out = self.attn(hidden_states=normed, encoder_hidden_states=normed_ctx,
                                       **joint_attention_kwargs)

    hidden_states = gated_residual(hidden_states, gate_msa, attn_out)
    if self.use_dual_attention:
        hidden_states = gated_residual(hidden_states, gate_msa2, self.attn2(hidden_states=normed2,
                                                                            **joint_attention_kwargs))
    normed = adaln_modulate(hidden_states, shift_mlp, scale_mlp, self.norm2.eps)
    hidden_states = gated_residual(hidden_states, gate_mlp, self.ff(normed))
    if self.context_pre_only:
        return None, hidden_states
    ctx = gated_residual(encoder_hidden_states, c_gate_msa, ctx_attn_out)
    normed_ctx = adaln_modulate(ctx, c_shift_mlp, c_scale_mlp, self.norm2_context.eps)
    return gated_residual(ctx, c_gate_mlp, self.ff_context(normed_ctx)), hidden_states


class DiTBlock(nn.Module):
    """DiT block: adaLN-Zero self-attention and GELU(tanh) feed-forward, conditioned on
    (timestep, class label) embedded by ``norm1.emb``. diffusers' DiT configuration:
    ``BasicTransformerBlock(dim, heads, head_dim, activation_fn="gelu-approximate",
    num_embeds_ada_norm=num_classes, attention_bias=True, norm_type="ada_norm_zero",
    norm_elementwise_affine=False)``."""

    norm_type = "ada_norm_zero"

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, num_embeds_ada_norm: int,
                 activation_fn: str = "gelu-approximate", attention_bias: bool = True, norm_eps: float = 1e-5,
                 dropout: float = 0.0):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, num_embeds_ada_norm)
        self.attn1 = Attention(dim, num_attention_heads, attention_head_dim, bias=attention_bias, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn)

    forward = dit_block_forward


class MMDiTBlock(nn.Module):
    """SD3 MM-DiT block: image and text streams, each adaLN-Zero modulated by ``temb``,
    attend jointly; ``context_pre_only`` (the last block) drops the text stream's output.
    SD3.5: ``qk_norm="rms_norm"`` normalises every q and k per head; ``use_dual_attention``
    adds ``attn2``, a self-attention over the image tokens modulated by
    :class:`SD35AdaLayerNormZeroX`'s extra (shift, scale, gate)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int,
                 context_pre_only: bool = False, qk_norm: str | None = None, use_dual_attention: bool = False,
                 qk_norm_eps: float = 1e-6):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.use_dual_attention = use_dual_attention
        self.norm1 = SD35AdaLayerNormZeroX(dim) if use_dual_attention else AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormContinuous(dim, dim) if context_pre_only else AdaLayerNormZero(dim)
        self.attn = Attention(dim, num_attention_heads, attention_head_dim, bias=True, added_kv_proj_dim=dim,
                              context_pre_only=context_pre_only, qk_norm=qk_norm, eps=qk_norm_eps)
        self.attn2 = None
        if use_dual_attention:
            self.attn2 = Attention(dim, num_attention_heads, attention_head_dim, bias=True, qk_norm=qk_norm,
                                   eps=qk_norm_eps)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")
        self.norm2_context = self.ff_context = None
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")

    forward = mmdit_block_forward
