"""diffusers ``FluxTransformer2DModel`` (FLUX.1-dev, Kontext, schnell): joint attention
(text + image tokens) on mmfast attention with the 3-axis rotary table applied inside the
kernel and the per-head q/k RMSNorms on ``rms_norm``; double-stream blocks with their
adaLN-Zero modulations and gated residuals fused; single-stream blocks with GELU(tanh) in
one pass and the output projection over [attention, MLP] as two accumulating GEMMs (no
concatenation); the final AdaLayerNormContinuous on ``adaln_modulate``.

Left on diffusers: the input embedders (``x_embedder``, ``context_embedder``), the
timestep / guidance / pooled-text embedding, ``FluxPosEmbed`` (it builds the rotary
table), the linear projections, ``proj_out``, the model's forward loop (ControlNet
residuals, gradient checkpointing), IP-adapter processors, and calls with an attention
mask (diffusers' processor runs them). ``sequence_parallel=group``: text and image tokens
split over the ranks, joint attention on Ulysses
(mmfast.integrations.diffusers.flux_sequence_parallel)."""

from mmfast.integrations.diffusers.replacements import (
    patch_ada_layer_norm_continuous, patch_ada_layer_norm_zero, patch_ada_layer_norm_zero_single, patch_attention,
    patch_flux_block, patch_flux_single_block, patch_gelu)
from mmfast.integrations.diffusers.flux_sequence_parallel import flux_sequence_parallel
from mmfast.integrations.patching import Family, Replacement


def check_rotary_axes(model, handle):
    """The rotary axes must cover the head dim exactly (FluxPosEmbed concatenates one table
    per axis; diffusers fails in a broadcast otherwise): a clear error at patch time."""
    config = getattr(model, "config", None)
    axes, head_dim = getattr(config, "axes_dims_rope", None), getattr(config, "attention_head_dim", None)
    if axes is not None and head_dim is not None and sum(axes) != head_dim:
        raise ValueError(f"axes_dims_rope: {tuple(axes)} sums to {sum(axes)}, expected the attention head dim "
                         f"{head_dim} (one rotary table column per pair of head-dim elements)")
    return model


FAMILY = Family(
    "diffusers-flux-transformer",
    model_classes=("FluxTransformer2DModel",),
    replacements=(
        Replacement(("FluxAttention",), patch_attention, "attention processor"),
        Replacement(("FluxTransformerBlock",), patch_flux_block, "double-stream block"),
        Replacement(("FluxSingleTransformerBlock",), patch_flux_single_block, "single-stream block"),
        Replacement(("AdaLayerNormZero",), patch_ada_layer_norm_zero, "adaLN-Zero"),
        Replacement(("AdaLayerNormZeroSingle",), patch_ada_layer_norm_zero_single, "adaLN-Zero (single stream)"),
        Replacement(("AdaLayerNormContinuous",), patch_ada_layer_norm_continuous, "adaLN"),
        Replacement(("GELU",), patch_gelu, "GELU"),
    ),
    prepare=check_rotary_axes,
    sequence_parallel=flux_sequence_parallel,
)
