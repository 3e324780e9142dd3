"""The latent-diffusion VAE (diffusers ``AutoencoderKL``: SD1.5, SDXL, SD3, Flux) with
mmfast blocks.

:func:`autoencoder_kl` builds diffusers' AutoencoderKL from its config (diffusers does
the wiring: down/up blocks, sampling convolutions, the latent distribution, tiling and
slicing) and :func:`use_mmfast_vae_blocks` puts mmfast modules in place of the parts
that move the most memory at image resolution:

- every ``ResnetBlock2D`` of the encoder and decoder (no time embedding) ->
  :class:`mmfast.nn.ResnetBlock2D`, GroupNorm+SiLU in one pass;
- the mid-block ``Attention`` -> :class:`mmfast.nn.spatial_attention.SpatialSelfAttention`
  (GroupNorm on mmfast's kernel, attention through ``mmfast.ops.attention``);
- ``conv_norm_out`` followed by ``conv_act`` (SiLU) -> one fused
  :class:`mmfast.nn.group_norm.GroupNorm` and an ``nn.Identity``.

Parameter names are unchanged, so a diffusers VAE checkpoint loads key for key and a
swapped VAE saves as diffusers' own. Both memory formats pass through: a channels_last
input stays channels_last through the swapped blocks. Needs diffusers (imported on call).
"""

from __future__ import annotations

from torch import nn

from mmfast.nn import resnet, spatial_attention
from mmfast.nn._swap import swap_modules
from mmfast.nn.group_norm import fuse_norm_out_silu


def _replacement(module: nn.Module) -> nn.Module | None:
    name = type(module).__name__
    if isinstance(module, (resnet.ResnetBlock2D, spatial_attention.SpatialSelfAttention)):
        return None  # already mmfast's
    if (name == "ResnetBlock2D" and resnet.fusable(module) and module.upsample is None
            and module.downsample is None):
        return resnet.ResnetBlock2D.like(module)
    if name == "Attention" and spatial_attention.fusable(module):
        return spatial_attention.SpatialSelfAttention.like(module)
    return None


def use_mmfast_vae_blocks(model: nn.Module) -> list[str]:
    """Replace, in place, the blocks of a diffusers ``AutoencoderKL`` (or its ``encoder`` /
    ``decoder``) that mmfast has modules for, keeping their weights and names; returns the
    qualified names replaced. Calling it again replaces nothing."""
    return swap_modules(model, _replacement) + fuse_norm_out_silu(model)


def autoencoder_kl(config) -> nn.Module:
    """A diffusers ``AutoencoderKL`` built from ``config`` (a dict or FrozenDict, as
    ``vae.config``) with mmfast blocks in it; load a diffusers state_dict into it as is."""
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_config(config)
    use_mmfast_vae_blocks(model)
    return model


__all__ = ["autoencoder_kl", "use_mmfast_vae_blocks"]
