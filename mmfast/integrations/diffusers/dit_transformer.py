"""diffusers ``DiTTransformer2DModel``: attention on mmfast attention, each adaLN-Zero
block's modulations and gated residuals fused, GELU in one pass. The model's final norm
and projection (inline in diffusers' forward) are left as they are.
``sequence_parallel=group``: image tokens split over the ranks, self-attention on Ulysses
(mmfast.integrations.diffusers.sequence_parallel)."""

from mmfast.integrations.diffusers.replacements import (
    patch_ada_layer_norm_zero, patch_attention, patch_basic_transformer_block, patch_gelu)
from mmfast.integrations.diffusers.sequence_parallel import dit_sequence_parallel
from mmfast.integrations.patching import Family, Replacement

FAMILY = Family(
    "diffusers-dit-transformer",
    model_classes=("DiTTransformer2DModel",),
    replacements=(
        Replacement(("Attention",), patch_attention, "attention processor"),
        Replacement(("BasicTransformerBlock",), patch_basic_transformer_block, "adaLN-Zero block"),
        Replacement(("AdaLayerNormZero",), patch_ada_layer_norm_zero, "adaLN-Zero"),
        Replacement(("GELU",), patch_gelu, "GELU"),
    ),
    sequence_parallel=dit_sequence_parallel,
)
