"""Qwen2-VL (Hugging Face transformers): the vision tower's per-frame attention becomes
packed varlen attention with fused rotary, fed by cached index plumbing; its LayerNorms
and QuickGELU MLPs, and the language model's RMSNorms and SiLU-gated MLPs, become
mmfast's fused ones; the language model's self-attention runs the "mmfast" attention
implementation."""

from mmfast.integrations.patching import Family, Replacement
from mmfast.integrations.transformers._fused_layers import patch_layer_norm, patch_rms_norm
from mmfast.integrations.transformers._qwen_vision import (
    patch_quick_gelu_mlp,
    patch_swiglu_mlp,
    patch_vision_attention,
    patch_vision_tower,
)
from mmfast.integrations.transformers.lm_attention import patch_decoder_attention


def _prepare(target, handle):
    patch_decoder_attention(target, handle)  # the language model's (the vision tower's attention is not causal)
    return target


FAMILY = Family(
    "qwen2_vl",
    model_classes=("Qwen2VLForConditionalGeneration", "Qwen2VLModel", "Qwen2VisionTransformerPretrainedModel"),
    replacements=(
        Replacement(("Qwen2VisionTransformerPretrainedModel",), patch_vision_tower, "cached vision indices"),
        Replacement(("VisionAttention",), patch_vision_attention, "varlen attention + fused rotary"),
        Replacement(("LayerNorm",), patch_layer_norm, "layer_norm"),
        Replacement(("Qwen2VLRMSNorm",), patch_rms_norm, "rms_norm"),
        Replacement(("VisionMlp",), patch_quick_gelu_mlp, "quick_gelu"),
        Replacement(("Qwen2MLP",), patch_swiglu_mlp, "swiglu"),
    ),
    prepare=_prepare,
    notes="the patch embedding is not replaced yet",
)
