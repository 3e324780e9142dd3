"""Named Wan 2.x text-to-video configurations, for building models with random weights
(profiling without checkpoints): ``wan-tiny`` (a CPU runs it in well under a second),
``wan2.1-1.3b`` and ``wan2.2-5b``.

    >>> model = WanVideoModel.from_preset("wan-tiny")
    >>> parts = wan_components("wan2.1-1.3b", text_encoder=False)   # diffusers / transformers modules

Where the real numbers come from: diffusers' own conversion script, which wrote the published
``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` and ``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` directories
(huggingface/diffusers, scripts/convert_wan_to_diffusers.py at commit 7d56827, read from the
code index; the published config.json files themselves were not found there):

- ``wan2.1-1.3b``: ``get_transformer_config("Wan-T2V-1.3B")`` (30 layers, 12 heads of 128,
  FFN 8960, 16 latent channels); the VAE is ``AutoencoderKLWan()`` with its defaults
  (``convert_vae``: base 96, z 16, 8x spatial and 4x temporal downsampling); the scheduler
  ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
  num_train_timesteps=1000, flow_shift=3.0)``; a plain ``WanPipeline``.
- ``wan2.2-5b``: ``get_transformer_config("Wan2.2-TI2V-5B")`` (30 layers, 24 heads of 128,
  FFN 14336, 48 latent channels); the VAE is ``vae22_diffusers_config`` (base 160, decoder
  base 256, z 48, residual, 2x2 pixel patches, 16x spatial); the same UniPC scheduler with
  ``flow_shift=5.0``; ``WanPipeline(..., expand_timesteps=True)`` (per-token timesteps) and
  no ``transformer_2`` (only the A14B models have the second expert).

The text encoder is UMT5-XXL (google/umt5-xxl, loaded by name in the script): vocabulary
256384, d_model 4096, FFN 10240, 64 heads, 24 layers, 32 relative-attention buckets, as a
third-party copy of the published text_encoder/config.json in the code index lists them;
the other fields are transformers' ``UMT5Config`` defaults (d_kv 64, gated-gelu). It has
5.7B parameters and only encodes the prompt: leave it out (``text_encoder=False``) when the
denoising loop is what is measured, and pass ``prompt_embeds``.
"""

from __future__ import annotations

import torch

_UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_ff=10240, num_heads=64, num_layers=24,
                 relative_attention_num_buckets=32)
_WAN_TRANSFORMER = dict(patch_size=(1, 2, 2), attention_head_dim=128, cross_attn_norm=True, eps=1e-6, freq_dim=256,
                        qk_norm="rms_norm_across_heads", text_dim=4096, added_kv_proj_dim=None)
_UNIPC_FLOW = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000)

WAN_PRESETS = {
    "wan-tiny": {
        # 2 heads of 32 (the 3D rotary splits them 12 + 10 + 10); Wan 2.1's VAE layout (8x
        # spatial, 4x temporal) on 8 base channels, so that frame counts are 4k + 1 as for the real ones.
        "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                            out_channels=4, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True,
                            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32),
        "vae": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                    temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                    latents_std=[1.5, 0.8, 1.0, 1.2]),
        "text_encoder": dict(vocab_size=100, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                             relative_attention_num_buckets=8),
        "scheduler": dict(**_UNIPC_FLOW, flow_shift=3.0),
        "pipeline": dict(expand_timesteps=False, boundary_ratio=None),
        # what the profile runs by default: (height, width, frames)
        "video": (32, 32, 5),
    },
    "wan2.1-1.3b": {
        "transformer": dict(_WAN_TRANSFORMER, num_attention_heads=12, in_channels=16, out_channels=16, ffn_dim=8960,
                            num_layers=30),
        "vae": dict(),  # AutoencoderKLWan's defaults are Wan 2.1's VAE
        "text_encoder": _UMT5_XXL,
        "scheduler": dict(**_UNIPC_FLOW, flow_shift=3.0),
        "pipeline": dict(expand_timesteps=False, boundary_ratio=None),
        "video": (480, 832, 33),
    },
    "wan2.2-5b": {
        "transformer": dict(_WAN_TRANSFORMER, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336,
                            num_layers=30),
        "vae": dict(
            base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
            # (the script's clip_output=False is left out: AutoencoderKLWan of diffusers 0.42 takes no such argument)
            scale_factor_temporal=4, scale_factor_spatial=16, patch_size=2,
            latents_mean=[-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542,
                          0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109,
                          0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899,
                          -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                          0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667],
            latents_std=[0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894,
                         1.0901, 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146,
                         0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709,
                         0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537,
                         0.5444, 0.4089, 0.7468, 0.7744]),
        "text_encoder": _UMT5_XXL,
        "scheduler": dict(**_UNIPC_FLOW, flow_shift=5.0),
        "pipeline": dict(expand_timesteps=True, boundary_ratio=None),
        "video": (480, 832, 33),
    },
}

# WanPipeline.__call__'s defaults.
PIPELINE_STEPS = 50
PIPELINE_GUIDANCE = 5.0
PIPELINE_MAX_SEQUENCE_LENGTH = 226


def wan_components(name: str, *, text_encoder: bool = True) -> dict:
    """The pipeline components of a preset with random weights, as diffusers and
    transformers build them: transformer (plain diffusers), vae, scheduler, text_encoder
    (None with ``text_encoder=False``), and the pipeline flags expand_timesteps and
    boundary_ratio."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if name not in WAN_PRESETS:
        raise ValueError(f"name: unknown Wan preset {name!r} (known: {', '.join(WAN_PRESETS)})")
    preset = WAN_PRESETS[name]
    with torch.device("cpu"):  # the scheduler's tables stay real under a meta-device build
        scheduler = UniPCMultistepScheduler(**preset["scheduler"])
    return {
        "transformer": WanTransformer3DModel(**preset["transformer"]),
        "vae": AutoencoderKLWan(**preset["vae"]),
        "scheduler": scheduler,
        "text_encoder": UMT5EncoderModel(UMT5Config(**preset["text_encoder"])) if text_encoder else None,
        **preset["pipeline"],
    }


__all__ = ["PIPELINE_GUIDANCE", "PIPELINE_MAX_SEQUENCE_LENGTH", "PIPELINE_STEPS", "WAN_PRESETS", "wan_components"]
