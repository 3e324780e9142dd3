"""diffusers ``Flux2Transformer2DModel`` (FLUX.2-dev, FLUX.2-klein): joint attention on
mmfast attention with the 4-axis rotary table applied inside the kernel and the per-head
q/k RMSNorms on ``rms_norm``; double-stream blocks with every modulation (``adaln_modulate``)
and gated residual fused; the single-stream blocks' parallel attention + SwiGLU MLP
(``Flux2ParallelSelfAttention``) with SwiGLU in one pass over two views of the fused input
projection and the fused output projection as two accumulating GEMMs (no concatenation);
SwiGLU of the double-stream MLPs in one pass; the final AdaLayerNormContinuous on
``adaln_modulate``.

Left on diffusers: the input embedders, the timestep / guidance embedding, the
``Flux2Modulation`` projections, ``Flux2PosEmbed``, the linear projections, ``proj_out``,
the model's forward loop, the KV-cache processors and the KV-cache "extract" mode's
per-token modulations (those blocks run diffusers' forward), and calls with an attention
mask. ``sequence_parallel=group``: text and image tokens split over the ranks, joint and
single-stream attention on Ulysses (mmfast.integrations.diffusers.flux_sequence_parallel)."""

from mmfast.integrations.diffusers.flux_sequence_parallel import flux2_sequence_parallel
from mmfast.integrations.diffusers.flux_transformer import check_rotary_axes
from mmfast.integrations.diffusers.replacements import (
    patch_ada_layer_norm_continuous, patch_attention, patch_flux2_block, patch_flux2_single_block, patch_flux2_swiglu)
from mmfast.integrations.patching import Family, Replacement

FAMILY = Family(
    "diffusers-flux2-transformer",
    model_classes=("Flux2Transformer2DModel",),
    replacements=(
        Replacement(("Flux2Attention", "Flux2ParallelSelfAttention"), patch_attention, "attention processor"),
        Replacement(("Flux2TransformerBlock",), patch_flux2_block, "double-stream block"),
        Replacement(("Flux2SingleTransformerBlock",), patch_flux2_single_block, "single-stream block"),
        Replacement(("Flux2SwiGLU",), patch_flux2_swiglu, "SwiGLU"),
        Replacement(("AdaLayerNormContinuous",), patch_ada_layer_norm_continuous, "adaLN"),
    ),
    prepare=check_rotary_axes,
    sequence_parallel=flux2_sequence_parallel,
)
