"""diffusers ``SD3Transformer2DModel`` (SD3 and SD3.5 MM-DiT): joint attention (and SD3.5's
image-only ``attn2``) on mmfast attention, each block's adaLN modulations and gated
residuals fused (SD35AdaLayerNormZeroX's two modulations included), SD3.5's q/k RMSNorms
on ``rms_norm``, the final AdaLayerNormContinuous on ``adaln_modulate``, GELU in one pass.
``sequence_parallel=group``: image and text tokens split over the ranks, joint attention
on Ulysses (mmfast.integrations.diffusers.sequence_parallel)."""

from mmfast.integrations.diffusers.replacements import (
    patch_ada_layer_norm_continuous, patch_ada_layer_norm_zero, patch_attention, patch_gelu, patch_joint_block,
    patch_rms_norm, patch_sd35_ada_layer_norm_zero_x)
from mmfast.integrations.diffusers.sequence_parallel import sd3_sequence_parallel
from mmfast.integrations.patching import Family, Replacement

FAMILY = Family(
    "diffusers-sd3-transformer",
    model_classes=("SD3Transformer2DModel",),
    replacements=(
        Replacement(("Attention",), patch_attention, "attention processor"),
        Replacement(("JointTransformerBlock",), patch_joint_block, "MM-DiT block"),
        Replacement(("AdaLayerNormZero",), patch_ada_layer_norm_zero, "adaLN-Zero"),
        Replacement(("SD35AdaLayerNormZeroX",), patch_sd35_ada_layer_norm_zero_x, "adaLN-Zero (dual attention)"),
        Replacement(("AdaLayerNormContinuous",), patch_ada_layer_norm_continuous, "adaLN"),
        Replacement(("RMSNorm",), patch_rms_norm, "q/k RMSNorm"),
        Replacement(("GELU",), patch_gelu, "GELU"),
    ),
    sequence_parallel=sd3_sequence_parallel,
)
