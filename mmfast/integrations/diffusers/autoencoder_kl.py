"""diffusers ``AutoencoderKL`` (the VAE of SD1.5, SDXL, SD3, Flux): encoder and decoder
ResnetBlock2D with GroupNorm+SiLU fused, the mid-block attention with its GroupNorm on
mmfast's kernel and mmfast attention, ``conv_norm_out`` and the SiLU after it in one pass
(see :mod:`mmfast.nn.autoencoder_kl` for the same swap as modules)."""

from mmfast.integrations.diffusers.replacements import patch_norm_out_silu, patch_resnet, patch_spatial_attention
from mmfast.integrations.patching import Family, Replacement

# No free-standing GroupNorm row: every GroupNorm of the VAE is inside one of these three.
FAMILY = Family(
    "diffusers-autoencoder-kl",
    model_classes=("AutoencoderKL",),
    replacements=(
        Replacement(("Encoder", "Decoder"), patch_norm_out_silu, "conv_norm_out + SiLU"),
        Replacement(("ResnetBlock2D",), patch_resnet, "GroupNorm+SiLU"),
        Replacement(("Attention",), patch_spatial_attention, "mid-block attention"),
    ),
)
