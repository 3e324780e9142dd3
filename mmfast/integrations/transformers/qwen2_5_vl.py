"""Qwen2.5-VL (Hugging Face transformers): the vision tower's window/full attention
becomes packed varlen attention with fused rotary, fed by cached window plumbing; every
RMSNorm and SiLU-gated MLP (vision and language model) becomes mmfast's fused one; the
language model's self-attention runs the "mmfast" attention implementation."""

from mmfast.integrations.patching import Family, Replacement
from mmfast.integrations.transformers._fused_layers import patch_rms_norm
from mmfast.integrations.transformers._qwen_vision import (
    patch_swiglu_mlp,
    patch_vision_attention,
    patch_vision_tower,
)
from mmfast.integrations.transformers.lm_attention import patch_decoder_attention


def _prepare(target, handle):
    patch_decoder_attention(target, handle)  # the language model's (the vision tower's attention is not causal)
    return target


FAMILY = Family(
    "qwen2_5_vl",
    model_classes=("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel",
                   "Qwen2_5_VisionTransformerPretrainedModel"),
    replacements=(
        Replacement(("Qwen2_5_VisionTransformerPretrainedModel",), patch_vision_tower, "cached vision indices"),
        Replacement(("Qwen2_5_VLVisionAttention",), patch_vision_attention, "varlen attention + fused rotary"),
        Replacement(("Qwen2_5_VLRMSNorm",), patch_rms_norm, "rms_norm"),
        Replacement(("Qwen2_5_VLMLP", "Qwen2MLP"), patch_swiglu_mlp, "swiglu"),
    ),
    prepare=_prepare,
    notes="the patch embedding is not replaced yet",
)
