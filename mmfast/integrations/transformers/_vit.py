"""Replacements shared by the ViT-style vision towers of transformers (CLIP, SigLIP):
each function patches one module instance through the PatchHandle, keeping its
parameters; the module's own class is untouched and ``handle.undo()`` restores it.

    *VisionEmbeddings  one fused kernel: patch GEMM + bias + position (+ class token)
    *Attention         mmfast.ops.attention on [B, T, H, D] (attention dropout while
                       training in its kernels, with its own masks); falls back to the
                       original forward for what it does not do (a mask, returned
                       attention weights)
    *EncoderLayer      the first residual add fused into layer_norm2
    *MLP               the activation as one fused pass (:mod:`._fused_layers`, which
                       also holds the LayerNorm replacement)

One behaviour differs on purpose: an image whose size is not a multiple of the patch
size raises a ValueError naming it, where the Conv2d of Hugging Face silently drops the
remainder rows and columns.
"""

from __future__ import annotations

from mmfast.integrations.transformers._fused_layers import patch_activation_mlp
from mmfast.integrations.transformers._outputs import asked
from mmfast.nn.patch_embed import PositionTableCache, embed_pixels
from mmfast.ops.attention import attention
from mmfast.ops.norm import layer_norm


def patch_embeddings(module, handle, name):
    cache = PositionTableCache()

    def forward(self, pixel_values, interpolate_pos_encoding=False):
        return embed_pixels(self, pixel_values, interpolate_pos_encoding, cache)

    handle.set_forward(module, forward, "fused patch+position embedding", name)


def _attention_forward(self, hidden_states, attention_mask=None, **kwargs):
    if attention_mask is not None or asked(self, kwargs, "attentions"):
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    heads = (*hidden_states.shape[:-1], -1, self.head_dim)
    q, k, v = (proj(hidden_states).view(heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
    out = attention(q, k, v, scale=self.scale, dropout_p=self.dropout if self.training else 0.0)
    return self.out_proj(out.reshape(*hidden_states.shape[:-1], -1)), None


def patch_attention(module, handle, name):
    handle.set_forward(module, _attention_forward, "mmfast attention", name)


def _encoder_layer_forward(self, hidden_states, attention_mask=None, **kwargs):
    norm1, norm2 = self.layer_norm1, self.layer_norm2
    attn, _ = self.self_attn(hidden_states=layer_norm(hidden_states, norm1.weight, norm1.bias, norm1.eps),
                             attention_mask=attention_mask, **kwargs)
    normed, hidden_states = layer_norm(attn, norm2.weight, norm2.bias, norm2.eps, residual=hidden_states)
    return hidden_states + self.mlp(normed)


def patch_encoder_layer(module, handle, name):
    handle.set_forward(module, _encoder_layer_forward, "layer norm fused with the residual add", name)


def patch_mlp(module, handle, name):
    patch_activation_mlp(module, handle, name, module.config.hidden_act)


TEXT_ONLY = ("CLIPTextModel", "CLIPTextModelWithProjection", "SiglipTextModel")


def vision_root(target):
    """The vision tower of a dual-encoder model, the vision model itself, or None for a
    text-only model (whose tower :mod:`._text` patches)."""
    if type(target).__name__ in TEXT_ONLY:
        return None
    return getattr(target, "vision_model", target)
