"""Idefics2 (Idefics2Model, Idefics2ForConditionalGeneration): the perceiver resampler's
attention runs mmfast's cross_attention (GQA, context padding as a KeyPaddingMask rather
than a dense [B, 1, L, T + L] mask), the residual add on the output GEMM. In training mode
the attention dropout runs in mmfast's kernels (its own masks, not Hugging Face's)."""

from __future__ import annotations

from mmfast.integrations.patching import Family, Replacement
from mmfast.nn.perceiver import context_mask, perceiver_attention


def _resampler_forward(self, context, attention_mask=None, **kwargs):
    batch = context.shape[0]
    latents = self.latents.unsqueeze(0).expand(batch, -1, -1)
    mask = context_mask(attention_mask, batch, latents.shape[1])
    for layer in self.layers:
        attn = layer.self_attn
        latents = perceiver_attention(attn, attn.num_heads, attn.num_key_value_heads, attn.head_dim,
                                      layer.input_latents_norm(latents), layer.input_context_norm(context),
                                      mask, residual=latents)
        latents = latents + layer.mlp(layer.post_attention_layernorm(latents))
    return self.norm(latents)


def _patch_resampler(module, handle, name):
    handle.set_forward(module, _resampler_forward, "perceiver cross_attention", name)


FAMILY = Family(
    "idefics2",
    model_classes=("Idefics2Model", "Idefics2ForConditionalGeneration"),
    replacements=(Replacement(("Idefics2PerceiverResampler",), _patch_resampler, "perceiver cross_attention"),),
)
