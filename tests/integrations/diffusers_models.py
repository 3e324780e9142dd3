"""Tiny random-weight diffusers models for the integration and nn tests (head dim 32, so
that mmfast's Triton attention, not a fallback, takes the calls)."""

import torch

HEAD_DIM = 32


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=2, cross_attention_dim=24,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2),  # diffusers' name for the head count: 32 channels a head
    ).eval()


def unet_inputs(batch=1, text_tokens=7):
    gen = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(batch, 4, 8, 8, generator=gen),
            "timestep": torch.tensor([10, 500][:batch]),
            "encoder_hidden_states": torch.randn(batch, text_tokens, 24, generator=gen)}


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=HEAD_DIM, num_attention_heads=2, joint_attention_dim=24,
        caption_projection_dim=64, pooled_projection_dim=16, pos_embed_max_size=16,
    ).eval()


def sd3_inputs(batch=2, text_tokens=7):
    gen = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=gen),
            "encoder_hidden_states": torch.randn(batch, text_tokens, 24, generator=gen),
            "pooled_projections": torch.randn(batch, 16, generator=gen),
            "timestep": torch.tensor([3.0, 700.0][:batch])}


def tiny_dit(num_classes=10):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes,
    ).eval()


def dit_inputs(batch=2):
    gen = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=gen),
            "timestep": torch.tensor([3, 700][:batch]),
            "class_labels": torch.tensor([1, 7][:batch])}


# FLUX: 3-axis (FLUX.1) / 4-axis (FLUX.2) rotary tables whose axes sum to HEAD_DIM.
FLUX_AXES = (8, 12, 12)
FLUX2_AXES = (8, 8, 8, 8)


def tiny_flux(guidance_embeds=True, axes_dims_rope=FLUX_AXES):
    """FLUX.1-dev-like (guidance_embeds=True; schnell: False): one double-stream and two
    single-stream blocks, 16 input channels (a 4-channel VAE latent packed 2x2)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
        axes_dims_rope=axes_dims_rope,
    ).eval()


def _image_ids(height, width, axes):
    """[h * w, axes] ids as the FLUX pipelines make them: (0, row, col[, 0])."""
    ids = torch.zeros(height, width, axes)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, axes)


def flux_inputs(batch=2, text_tokens=7, guidance=True, height=3, width=4):
    gen = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(batch, height * width, 16, generator=gen),
              "encoder_hidden_states": torch.randn(batch, text_tokens, 24, generator=gen),
              "pooled_projections": torch.randn(batch, 16, generator=gen),
              "timestep": torch.tensor([0.3, 0.9][:batch]),
              "img_ids": _image_ids(height, width, 3), "txt_ids": torch.zeros(text_tokens, 3)}
    if guidance:
        inputs["guidance"] = torch.tensor([3.5, 2.0][:batch])
    return inputs


def tiny_flux2(guidance_embeds=True, axes_dims_rope=FLUX2_AXES):
    """FLUX.2-like: no biases, one double-stream and two single-stream blocks."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32, mlp_ratio=3.0,
        axes_dims_rope=axes_dims_rope, guidance_embeds=guidance_embeds,
    ).eval()


def flux2_inputs(batch=2, text_tokens=7, guidance=True, height=3, width=4):
    gen = torch.Generator().manual_seed(1)
    text_ids = torch.zeros(text_tokens, 4)
    text_ids[:, 3] = torch.arange(text_tokens)  # FLUX.2 numbers text tokens on its 4th axis
    inputs = {"hidden_states": torch.randn(batch, height * width, 16, generator=gen),
              "encoder_hidden_states": torch.randn(batch, text_tokens, 24, generator=gen),
              "timestep": torch.tensor([0.3, 0.9][:batch]),
              "img_ids": _image_ids(height, width, 4), "txt_ids": text_ids}
    if guidance:
        inputs["guidance"] = torch.tensor([3.5, 2.0][:batch])
    return inputs
