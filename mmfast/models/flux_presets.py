"""Named FLUX configurations, for building models with random weights (profiling without
checkpoints): ``flux-tiny`` and ``flux2-tiny`` (a CPU runs them in well under a second),
``flux.1-dev`` and ``flux.2-klein``.

    >>> model = FluxModel.from_preset("flux-tiny")
    >>> parts = flux_components("flux.1-dev")   # diffusers modules, random weights

No text encoders: mmfast's FLUX models take prompt embeddings (see :mod:`mmfast.models.flux`).

Sources of the real numbers (public copies of the published config files, found in the
code index this project searches; the hub itself is never contacted):

- ``flux.1-dev``: black-forest-labs/FLUX.1-dev transformer/config.json and vae/config.json
  as embedded verbatim (``_TRANSFORMER_CONFIG``, ``_VAE_CONFIG``, "Flux1-dev component
  configs") in a RunPod inference handler (code-index file 60788363346); the same
  transformer values in hpcaitech/Open-Sora configs/diffusion/inference/plugins/t2i2v.py
  (BFL naming). Scheduler: the FLUX scheduler_config.json values of taproot's
  ``FluxScheduler.get_default_config`` (pypi-data/pypi-mirror-328,
  taproot-0.3.8 .../flux/pretrained/scheduler.py).
- ``flux.2-klein``: black-forest-labs/FLUX.2-klein-4B transformer/config.json, quoted
  verbatim ("byte-identical to the distilled FLUX.2-Klein-4B one") in code-index file
  59425432298; the FLUX.2 VAE (``AutoencoderKLFlux2``, shared by all FLUX.2 models) as
  quoted in code-index file 57932856367. No published copy of klein's
  scheduler/scheduler_config.json was found: the preset uses FLUX.1-dev's flow-match
  values (Flux2KleinPipeline passes its own ``mu`` every call, which takes effect only
  with ``use_dynamic_shifting``); this changes the schedule, not what a step costs.
  ``flux.2-klein`` is the step-distilled 4B model (``is_distilled``: no CFG).
"""

from __future__ import annotations

# FLUX.1-dev scheduler_config.json (see the module docstring).
_FLUX1_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)

FLUX_PRESETS = {
    "flux-tiny": {
        "generation": 1,
        "transformer": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                            guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    layers_per_block=1, norm_num_groups=2, sample_size=16, scaling_factor=0.3611,
                    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        "scheduler": dict(_FLUX1_SCHEDULER, base_image_seq_len=4, max_image_seq_len=64),
        "text_tokens": 8,
    },
    "flux.1-dev": {
        "generation": 1,
        "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True),
        "scheduler": _FLUX1_SCHEDULER,
        "text_tokens": 512,  # FluxPipeline's max_sequence_length
    },
    "flux2-tiny": {
        "generation": 2,
        "transformer": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
                            mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=False),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    layers_per_block=1, norm_num_groups=2, sample_size=16),
        "scheduler": dict(_FLUX1_SCHEDULER, base_image_seq_len=4, max_image_seq_len=64),
        "text_tokens": 8,
        "is_distilled": True,
    },
    "flux.2-klein": {
        "generation": 2,
        "transformer": dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
                            mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6,
                            guidance_embeds=False, out_channels=None),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=2, norm_num_groups=32, sample_size=1024, use_quant_conv=True,
                    use_post_quant_conv=True, mid_block_add_attention=True, batch_norm_eps=1e-4,
                    batch_norm_momentum=0.1, patch_size=(2, 2), act_fn="silu"),
        "scheduler": _FLUX1_SCHEDULER,
        "text_tokens": 512,  # Flux2KleinPipeline's max_sequence_length
        "is_distilled": True,
    },
}


def flux_preset(name: str) -> dict:
    if name not in FLUX_PRESETS:
        raise ValueError(f"name: unknown FLUX preset {name!r} (known: {', '.join(FLUX_PRESETS)})")
    return FLUX_PRESETS[name]


def flux_components(name: str) -> dict:
    """The pipeline components of a preset with random weights, as diffusers builds them:
    transformer (plain diffusers), vae, scheduler."""
    import diffusers

    preset = flux_preset(name)
    flux2 = preset["generation"] == 2
    transformer = (diffusers.Flux2Transformer2DModel if flux2 else diffusers.FluxTransformer2DModel)
    vae = diffusers.AutoencoderKLFlux2 if flux2 else diffusers.AutoencoderKL
    return {"transformer": transformer(**preset["transformer"]), "vae": vae(**preset["vae"]),
            "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(**preset["scheduler"])}


__all__ = ["FLUX_PRESETS", "flux_components", "flux_preset"]
