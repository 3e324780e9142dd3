"""SigLIP2 (transformers Siglip2VisionModel, Siglip2Model, Siglip2TextModel).

The vision tower runs NaFlex batches packed (:mod:`._naflex`): only the real patches of
each image go through the patch GEMM (with its resized position embeddings folded into
the same ``addmm``), the encoder layers and varlen attention over ``cu_seqlens``; the
result is scattered back to Hugging Face's padded layout. Padded positions of
``last_hidden_state`` are zeros (Hugging Face computes values there from the padding,
which its pooling head masks out, as it does here).

Both towers' layers are patched by module as for SigLIP (:mod:`._vit`: fused residual
LayerNorm, fused activation MLP, mmfast LayerNorm); their attention falls back to the
original for a padding mask outside the packed path. Calls asking for per-layer hidden
states or attention weights run Hugging Face's padded forward (on those patched layers).
"""

from __future__ import annotations

import torch

from mmfast.integrations.patching import Family, Replacement
from mmfast.integrations.transformers import _naflex, _vit
from mmfast.integrations.transformers._fused_layers import patch_layer_norm
from mmfast.integrations.transformers._outputs import asked
from mmfast.ops.attention import attention


def _attention_forward(self, hidden_states, attention_mask=None, cu_seqlens=None, max_seqlen=None, **kwargs):
    if cu_seqlens is None:  # the padded path: SigLIP's replacement (original forward for a mask)
        return _vit._attention_forward(self, hidden_states, attention_mask, **kwargs)
    tokens = hidden_states.shape[-2]
    x = hidden_states.reshape(tokens, -1)
    q, k, v = (proj(x).view(tokens, -1, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
    out = attention(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                    max_seqlen_k=max_seqlen, scale=self.scale, dropout_p=self.dropout if self.training else 0.0)
    return self.out_proj(out.reshape(hidden_states.shape)), None


def patch_attention(module, handle, name):
    handle.set_forward(module, _attention_forward, "mmfast attention (varlen over NaFlex packing)", name)


def _packed_embeddings(embeddings, pixel_values, packing):
    """Patch GEMM over the real patches only, bias and resized positions in its addend."""
    linear = embeddings.patch_embedding
    patches = pixel_values[packing.valid].to(linear.weight.dtype)
    positions = _naflex.resized_positions(embeddings.position_embedding.weight, packing.shapes)
    addend = positions if linear.bias is None else positions + linear.bias
    return torch.addmm(addend.to(linear.weight.dtype), patches, linear.weight.t())


def _vision_model_forward(self, pixel_values, pixel_attention_mask, spatial_shapes, **kwargs):
    if asked(self, kwargs, "hidden_states") or asked(self, kwargs, "attentions"):
        return type(self).forward(self, pixel_values, pixel_attention_mask, spatial_shapes, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    embeddings = self.embeddings
    packing = _naflex.pack(pixel_values, pixel_attention_mask, spatial_shapes,
                           embeddings.patch_embedding.in_features)
    hidden = _packed_embeddings(embeddings, pixel_values, packing)[None]
    for layer in self.encoder.layers:
        hidden = layer(hidden, None, cu_seqlens=packing.cu_seqlens, max_seqlen=packing.max_seqlen)
    last = _naflex.unpack(self.post_layernorm(hidden[0]), packing)
    pooled = self.head(last, pixel_attention_mask) if self.use_head else None
    out = BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled)
    return out if kwargs.get("return_dict", getattr(self.config, "return_dict", True)) else out.to_tuple()


def patch_vision_model(module, handle, name):
    handle.set_forward(module, _vision_model_forward, "NaFlex batch packed (no padded token computed)", name)


def _prepare(target, handle):
    towers = [getattr(target, attr, None) for attr in ("vision_model", "text_model")]
    return [tower for tower in towers if tower is not None] or target


FAMILY = Family(
    "siglip2",
    model_classes=("Siglip2VisionModel", "Siglip2Model", "Siglip2TextModel"),
    replacements=(
        Replacement(("Siglip2VisionModel",), patch_vision_model,
                    "NaFlex batch packed (no padded token computed)"),
        Replacement(("Siglip2Attention",), patch_attention, "mmfast attention"),
        Replacement(("Siglip2EncoderLayer",), _vit.patch_encoder_layer, "norm fused with residual add"),
        Replacement(("Siglip2MLP",), _vit.patch_mlp, "fused activation"),
        Replacement(("LayerNorm",), patch_layer_norm, "mmfast layer_norm"),
    ),
    prepare=_prepare,
    notes="vision tower packed over NaFlex masks; both towers' layers by module",
)
