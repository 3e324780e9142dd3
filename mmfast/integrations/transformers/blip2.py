"""BLIP-2 (Blip2Model, Blip2ForConditionalGeneration, and the other Blip2* models holding a
Q-Former): the Q-Former runs mmfast's cross_attention (padding as KeyPaddingMask, no dense
masks) with each residual add fused into its LayerNorm (mmfast.nn.qformer.qformer_forward
on the instance's own weights).

Hugging Face's forward is kept when attention weights or hidden states are asked for (as
arguments or on the config) and for tuple outputs. In
training mode the attention-probability dropout runs in mmfast's kernels (its own masks,
from torch's default generator, not the ones Hugging Face would draw).
"""

from __future__ import annotations

from mmfast.integrations.patching import Family, Replacement
from mmfast.integrations.transformers._outputs import asked, collected
from mmfast.nn.qformer import qformer_forward



def _needs_original(qformer, kwargs) -> bool:
    """Attention weights or hidden states asked for (argument, config, or an enclosing
    forward collecting outputs through hooks inside the Q-Former), or a tuple output."""
    if asked(qformer, kwargs, "attentions") or asked(qformer, kwargs, "hidden_states") or collected():
        return True
    return kwargs.get("return_dict", getattr(qformer.config, "return_dict", True)) is False


def _qformer_forward(self, query_embeds, query_length=None, attention_mask=None, encoder_hidden_states=None,
                     encoder_attention_mask=None, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    if _needs_original(self, kwargs):
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
