"""diffusers ``SD3Transformer2DModel`` (SD3 MM-DiT): joint attention on mmfast attention,
each block's adaLN modulations and gated residuals fused, the final AdaLayerNormContinuous
on ``adaln_modulate``, GELU in one pass. SD3.5's dual-attention blocks keep diffusers' block forward (their
attention processors and adaptive norms are still replaced where they match)."""

from mmfast.integrations.diffusers.replacements import (
    patch_ada_layer_norm_continuous, patch_ada_layer_norm_zero, patch_attention, patch_gelu, patch_joint_block)
from mmfast.integrations.patching import Family, Replacement

FAMILY = Family(
    "diffusers-sd3-transformer",
    model_classes=("SD3Transformer2DModel",),
    replacements=(
        Replacement(("Attention",), patch_attention, "attention processor"),
        Replacement(("JointTransformerBlock",), patch_joint_block, "MM-DiT block"),
        Replacement(("AdaLayerNormZero",), patch_ada_layer_norm_zero, "adaLN-Zero"),
        Replacement(("AdaLayerNormContinuous",), patch_ada_layer_norm_continuous, "adaLN"),
        Replacement(("GELU",), patch_gelu, "GELU"),
    ),
)
