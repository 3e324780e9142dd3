"""diffusers ``UNet2DConditionModel`` (SD1.5 / SD2 family): attention processors on
mmfast attention, ResnetBlock2D with GroupNorm+SiLU fused, transformer blocks with their
residual adds fused into the LayerNorms, GEGLU in one pass, the other GroupNorms on
mmfast's kernel."""

from mmfast.integrations.diffusers.replacements import (
    patch_attention, patch_basic_transformer_block, patch_geglu, patch_group_norm, patch_resnet)
from mmfast.integrations.patching import Family, Replacement

FAMILY = Family(
    "diffusers-unet2d-condition",
    model_classes=("UNet2DConditionModel",),
    replacements=(
        Replacement(("Attention",), patch_attention, "attention processor"),
        Replacement(("ResnetBlock2D",), patch_resnet, "GroupNorm+SiLU"),
        Replacement(("BasicTransformerBlock",), patch_basic_transformer_block, "transformer block"),
        Replacement(("GEGLU",), patch_geglu, "GEGLU"),
        Replacement(("GroupNorm",), patch_group_norm, "GroupNorm"),
    ),
)
