"""Tiny random-weight diffusers Wan models (head dim 32, so that mmfast's Triton attention,
not a fallback, takes the calls; the 3D rotary splits it 12 + 10 + 10)."""

import torch

TEXT_DIM = 16


def tiny_wan(**overrides):
    """WanTransformer3DModel, Wan 2.1 T2V layout: 2 heads of 32, 2 blocks."""
    from diffusers import WanTransformer3DModel

    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                  out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=96, num_layers=2,
                  cross_attn_norm=True, rope_max_seq_len=32)
    config.update(overrides)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).eval()
    with torch.no_grad():  # norm weights off 1 and biases off 0, so that a forgotten one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, device=p.device))
    return model


def tiny_wan_i2v():
    """Wan 2.1 I2V layout: an image embedder and the attention's image-context branch."""
    return tiny_wan(image_dim=24, added_kv_proj_dim=32 * 2)


def wan_inputs(batch=2, frames=3, height=8, width=8, text_tokens=7, image_tokens=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    inputs = {"hidden_states": torch.randn(batch, 4, frames, height, width, generator=gen),
              "timestep": torch.tensor([3.0, 700.0, 250.0][:batch]),
              "encoder_hidden_states": torch.randn(batch, text_tokens, TEXT_DIM, generator=gen)}
    if image_tokens is not None:
        inputs["encoder_hidden_states_image"] = torch.randn(batch, image_tokens, 24, generator=gen)
    return inputs


def tiny_wan_vae():
    """AutoencoderKLWan: one spatial and one temporal halving (latent 4 channels)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                            latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 1.2],
                            scale_factor_temporal=2, scale_factor_spatial=2).eval()


def tiny_wan_pipeline():
    """WanPipeline without a text encoder (callers pass prompt_embeds: no tokenizer can be
    downloaded), the tiny transformer and VAE, a flow-match scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(), transformer=tiny_wan(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
