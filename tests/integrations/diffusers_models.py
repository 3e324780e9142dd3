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
