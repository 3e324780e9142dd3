"""FLUX transformer blocks on mmfast ops, as forward functions for diffusers' blocks
(applied through ``mmfast.patch``): ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock``
(FLUX.1-dev, Kontext, schnell) and ``Flux2TransformerBlock`` / ``Flux2SingleTransformerBlock``
(FLUX.2).

Double-stream blocks: image and text each modulated (``adaln_modulate``), joint attention,
gated residuals (``gated_residual``), each stream's MLP. Single-stream blocks: one
modulated input feeds attention and the MLP in parallel; their outputs meet in one output
projection, run as two accumulating GEMMs over the weight's column blocks instead of a
GEMM over their concatenation (:func:`mmfast.nn.flux_attention.split_linear`).

FLUX.2 modulations come from the model (``Flux2Modulation``), one row per sample. A
per-token modulation (the KV-cache "extract" mode blends reference-token rows in) is
not of that shape: such calls run diffusers' own forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfast.nn.flux_attention import split_linear
from mmfast.ops.activation import gelu, swiglu
from mmfast.ops.adaln import adaln_modulate, gated_residual

_FP16_MAX = 65504


def _plain_layer_norm(norm) -> bool:
    return type(norm) is nn.LayerNorm and not norm.elementwise_affine


def _clip_fp16(x: Tensor) -> Tensor:
    # diffusers clips fp16 residual streams (inf -> the largest finite value)
    return x.clip(-_FP16_MAX, _FP16_MAX) if x.dtype == torch.float16 else x


# ---- FLUX.1 ----------------------------------------------------------------------------


def flux_block_fusable(block) -> bool:
    """Whether a diffusers FluxTransformerBlock has LayerNorms without affine under every
    modulation (as FLUX.1 builds it)."""
    return all(_plain_layer_norm(getattr(getattr(block, name), "norm", None)) for name in ("norm1", "norm1_context")) \
        and _plain_layer_norm(block.norm2) and _plain_layer_norm(block.norm2_context)


def flux_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                       joint_attention_kwargs=None):
    """diffusers FluxTransformerBlock.forward: returns (encoder_hidden_states, hidden_states)."""
    normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    normed_ctx, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, emb=temb)
    outputs = self.attn(hidden_states=normed, encoder_hidden_states=normed_ctx, image_rotary_emb=image_rotary_emb,
                        **(joint_attention_kwargs or {}))
    attn_output, ctx_attn_output = outputs[0], outputs[1]

    hidden_states = gated_residual(hidden_states, gate_msa, attn_output)
    normed = adaln_modulate(hidden_states, shift_mlp, scale_mlp, self.norm2.eps)
    hidden_states = gated_residual(hidden_states, gate_mlp, self.ff(normed))
    if len(outputs) == 3:  # an IP-adapter processor's image-prompt attention
        hidden_states = hidden_states + outputs[2]

    ctx = gated_residual(encoder_hidden_states, c_gate_msa, ctx_attn_output)
    normed_ctx = adaln_modulate(ctx, c_shift_mlp, c_scale_mlp, self.norm2_context.eps)
    ctx = gated_residual(ctx, c_gate_mlp, self.ff_context(normed_ctx))
    return _clip_fp16(ctx), hidden_states


def flux_single_block_fusable(block) -> bool:
    return _plain_layer_norm(getattr(block.norm, "norm", None))


def flux_single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                              joint_attention_kwargs=None):
    """diffusers FluxSingleTransformerBlock.forward: text and image tokens as one
    sequence, attention and GELU(tanh) MLP in parallel, one output projection (split, no
    concatenation), a gated residual. Returns (encoder_hidden_states, hidden_states)."""
    text_tokens = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    normed, gate = self.norm(hidden_states, emb=temb)
    act = self.act_mlp
    if type(act) is nn.GELU and not act._forward_hooks and not act._forward_pre_hooks:
        mlp = gelu(self.proj_mlp(normed), approximate=act.approximate)
    else:
        mlp = act(self.proj_mlp(normed))
    attn_output = self.attn(hidden_states=normed, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    hidden_states = _clip_fp16(gated_residual(hidden_states, gate, split_linear(self.proj_out, attn_output, mlp)))
    return hidden_states[:, :text_tokens], hidden_states[:, text_tokens:]


# ---- FLUX.2 ----------------------------------------------------------------------------


def _per_sample(mods: tuple[Tensor, ...], batch: int) -> bool:
    """Whether every modulation tensor holds one row per sample ([B, n] or [B, 1, n])."""
    return all(m.shape[0] == batch and (m.dim() == 2 or (m.dim() == 3 and m.shape[1] == 1)) for m in mods)


def _split_mod(mod: Tensor, sets: int) -> list[Tensor]:
    """Flux2Modulation.split for one row per sample: 3 * sets [B, C] views
    (shift, scale, gate for each set)."""
    return list(mod.reshape(mod.shape[0], -1).chunk(3 * sets, dim=-1))


def flux2_block_fusable(block) -> bool:
    return all(_plain_layer_norm(getattr(block, n)) for n in ("norm1", "norm1_context", "norm2", "norm2_context"))


def flux2_block_forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt,
                        image_rotary_emb=None, joint_attention_kwargs=None):
    """diffusers Flux2TransformerBlock.forward: returns (encoder_hidden_states, hidden_states)."""
    if not (_per_sample((temb_mod_img,), hidden_states.shape[0])
            and _per_sample((temb_mod_txt,), encoder_hidden_states.shape[0])):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt,
                                  image_rotary_emb, joint_attention_kwargs)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _split_mod(temb_mod_img, 2)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _split_mod(temb_mod_txt, 2)

    normed = adaln_modulate(hidden_states, shift_msa, scale_msa, self.norm1.eps)
    normed_ctx = adaln_modulate(encoder_hidden_states, c_shift_msa, c_scale_msa, self.norm1_context.eps)
    attn_output, ctx_attn_output = self.attn(hidden_states=normed, encoder_hidden_states=normed_ctx,
                                             image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))

    hidden_states = gated_residual(hidden_states, gate_msa, attn_output)
    normed = adaln_modulate(hidden_states, shift_mlp, scale_mlp, self.norm2.eps)
    hidden_states = gated_residual(hidden_states, gate_mlp, self.ff(normed))

    ctx = gated_residual(encoder_hidden_states, c_gate_msa, ctx_attn_output)
    normed_ctx = adaln_modulate(ctx, c_shift_mlp, c_scale_mlp, self.norm2_context.eps)
    ctx = gated_residual(ctx, c_gate_mlp, self.ff_context(normed_ctx))
    return _clip_fp16(ctx), hidden_states


def flux2_single_block_fusable(block) -> bool:
    return _plain_layer_norm(block.norm)


def flux2_single_block_forward(self, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb=None,
                               joint_attention_kwargs=None, split_hidden_states=False, text_seq_len=None):
    """diffusers Flux2SingleTransformerBlock.forward: the parallel attention + SwiGLU MLP
    (``Flux2ParallelSelfAttention``) on one modulated input, a gated residual."""
    if not _per_sample((temb_mod,), hidden_states.shape[0]):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb,
                                  joint_attention_kwargs, split_hidden_states, text_seq_len)
    if encoder_hidden_states is not None:
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    shift, scale, gate = _split_mod(temb_mod, 1)
    normed = adaln_modulate(hidden_states, shift, scale, self.norm.eps)
    attn_output = self.attn(hidden_states=normed, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    hidden_states = _clip_fp16(gated_residual(hidden_states, gate, attn_output))
    if split_hidden_states:
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return hidden_states


def flux2_swiglu_forward(self, x):
    """diffusers Flux2SwiGLU.forward: ``silu(x[..., :N]) * x[..., N:]`` in one pass."""
    return swiglu(x, gate_first=True)


__all__ = ["flux2_block_forward", "flux2_block_fusable", "flux2_single_block_forward", "flux2_single_block_fusable",
           "flux2_swiglu_forward", "flux_block_forward", "flux_block_fusable", "flux_single_block_forward",
           "flux_single_block_fusable"]
