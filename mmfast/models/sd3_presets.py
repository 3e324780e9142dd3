"""Named Stable Diffusion 3 configurations, for building models with random weights
(profiling without checkpoints): ``sd3-tiny`` (a CPU runs it in well under a second),
``sd3-medium``, ``sd35-medium`` and ``sd35-large``.

    >>> model = StableDiffusion3Model.from_preset("sd3-tiny")
    >>> parts = sd3_components("sd3-medium", text_encoder_3=False)   # diffusers / transformers modules

``sd3-medium`` carries the values of the published configs of
stabilityai/stable-diffusion-3-medium-diffusers: the MM-DiT (24 layers, 24 heads of 64),
the 16-channel VAE (scaling 1.5305, shift 0.0609), CLIP-L/14 and OpenCLIP bigG/14 text
encoders with projection, T5 v1.1 XXL, and the flow-match scheduler with shift 3.0.
T5-XXL (4.7B parameters) is the largest part and only encodes the prompt; leave it out
(``text_encoder_3=False``) when the denoising loop is what is measured: the model then
gives zeros for its tokens, as diffusers does.

``sd35-medium`` and ``sd35-large`` carry the transformer configs of
stabilityai/stable-diffusion-3.5-medium (24 layers, 24 heads of 64, RMSNorm q/k norms,
dual attention in blocks 0..12, position table 384) and -large (38 layers, 38 heads of 64,
RMSNorm q/k norms, caption projection 2432); their other components are SD3-medium's.
SD3.5-large's transformer has about 8B parameters: 32 GB in fp32 as built, before the cast.
"""

from __future__ import annotations

SD3_PRESETS = {
    "sd3-tiny": {
        "transformer": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                            attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                            caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=16),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    layers_per_block=1, norm_num_groups=2, sample_size=16, scaling_factor=1.5305,
                    shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        # bos/eos: the vocabulary's last two ids, as CLIP's 49406/49407 of 49408.
        "clip": dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=8, projection_dim=32, hidden_act="gelu", bos_token_id=98,
                     eos_token_id=99, pad_token_id=1),
        "clip_2": dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=8, projection_dim=32, hidden_act="gelu",
                       bos_token_id=98, eos_token_id=99, pad_token_id=1),
        "t5": dict(vocab_size=100, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8),
        "scheduler": dict(num_train_timesteps=1000, shift=3.0),
    },
    "sd3-medium": {
        "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                            caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305,
                    shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True),
        "clip": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                     bos_token_id=0, eos_token_id=2, pad_token_id=1),
        "clip_2": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                       num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
                       bos_token_id=0, eos_token_id=2, pad_token_id=1),
        "t5": dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        "scheduler": dict(num_train_timesteps=1000, shift=3.0),
    },
}


# SD3.5 keeps SD3-medium's VAE, text encoders and scheduler (shift 3.0); its MM-DiTs add
# per-head RMSNorm q/k norms, and 3.5-medium dual attention in its first 13 blocks.
_SD3_MEDIUM_REST = {k: v for k, v in SD3_PRESETS["sd3-medium"].items() if k != "transformer"}
SD3_PRESETS["sd35-medium"] = {
    "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                        qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    **_SD3_MEDIUM_REST,
}
SD3_PRESETS["sd35-large"] = {
    "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                        caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
    **_SD3_MEDIUM_REST,
}


def sd3_components(name: str, *, text_encoder_3: bool = True) -> dict:
    """The pipeline components of a preset with random weights, as diffusers and
    transformers build them: transformer (plain diffusers), vae, scheduler, text_encoder,
    text_encoder_2, text_encoder_3 (None with ``text_encoder_3=False``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if name not in SD3_PRESETS:
        raise ValueError(f"name: unknown Stable Diffusion 3 preset {name!r} (known: {', '.join(SD3_PRESETS)})")
    preset = SD3_PRESETS[name]
    return {
        "transformer": SD3Transformer2DModel(**preset["transformer"]),
        "vae": AutoencoderKL(**preset["vae"]),
        "scheduler": FlowMatchEulerDiscreteScheduler(**preset["scheduler"]),
        "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**preset["clip"])),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**preset["clip_2"])),
        "text_encoder_3": T5EncoderModel(T5Config(**preset["t5"])) if text_encoder_3 else None,
    }


__all__ = ["SD3_PRESETS", "sd3_components"]
