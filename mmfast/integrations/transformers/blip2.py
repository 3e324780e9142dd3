"""BLIP-2 (Blip2Model, Blip2ForConditionalGeneration, and the other Blip2* models holding a
Q-Former): the Q-Former runs mmfast's cross_attention (padding as KeyPaddingMask, no dense
masks) with each residual add fused into its LayerNorm (mmfast.nn.qformer.qformer_forward
on the instance's own weights).

Hugging Face's forward is kept when attention weights or hidden states are asked for. In
training mode the attention-probability dropout runs in mmfast's kernels (its own masks,
from torch's default generator, not the ones Hugging Face would draw).
"""

from __future__ import annotations

from mmfast.integrations.patching import Family, Replacement
from mmfast.nn.qformer import qformer_forward

_NEEDS_HF = ("output_attentions", "output_hidden_states")


def _qformer_forward(self, query_embeds, query_length=None, attention_mask=None, encoder_hidden_states=None,
                     encoder_attention_mask=None, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    if any(kwargs.get(name) for name in _NEEDS_HF) or kwargs.get("return_dict") is False:
        return type(self).forward(self, query_embeds, query_length, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask, **kwargs)
    sequence = qformer_forward(self, self.config.num_attention_heads, query_embeds, query_length,
                               attention_mask, encoder_hidden_states, encoder_attention_mask)
    return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=sequence, pooler_output=sequence[:, 0, :])


def _patch_qformer(module, handle, name):
    handle.set_forward(module, _qformer_forward, "qformer cross_attention", name)


FAMILY = Family(
    "blip2",
    model_classes=("Blip2Model", "Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval",
                   "Blip2TextModelWithProjection", "Blip2VisionModelWithProjection", "Blip2QFormerModel"),
    replacements=(Replacement(("Blip2QFormerModel",), _patch_qformer, "qformer cross_attention"),),
)
