"""The latent-diffusion workload: mmfast's ``LatentDiffusionModel`` and diffusers'
``StableDiffusionPipeline`` over the same components and weights (the pipeline runs the
original diffusers UNet; mmfast's UNet is rebuilt with mmfast blocks and loaded from its
state dict). Text encoder and VAE are the same modules on both sides.

Both sides take the same prompt embeddings (text encoding is the identical transformers
CLIP text model on both sides, so it is left out); denoising (it/s) is timed with latent
output, end to end with the VAE decode.

Presets (random weights): ``tiny`` (a CPU runs it in well under a second) and ``sd15``,
the Stable Diffusion 1.5 component configs (UNet, VAE, CLIP ViT-L/14 text encoder) with
an Euler discrete scheduler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

PRESETS = ("tiny", "sd15")
_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1)


@dataclass
class Side:
    name: str
    generate: Callable[[str], object]  # output type ("latent" or "pt") -> output


def _components(preset: str) -> dict:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset == "tiny":
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            norm_num_groups=2, cross_attention_dim=32, attention_head_dim=(1, 2),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=2, sample_size=16)
        text = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=8)
    else:  # the configs of stable-diffusion-v1-5's unet/, vae/ and text_encoder/
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            latent_channels=4)
        text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                              projection_dim=768)
    return {"unet": unet, "vae": vae, "text_encoder": CLIPTextModel(text),
            "scheduler": EulerDiscreteScheduler(**_SCHEDULE)}


def build(preset: str, checkpoint: str | None, device: torch.device, dtype: torch.dtype):
    """(mmfast LatentDiffusionModel, diffusers StableDiffusionPipeline, description)."""
    import copy

    from diffusers import StableDiffusionPipeline

    from mmfast.models import LatentDiffusionModel
    from mmfast.nn import unet2d_condition_model

    if checkpoint is not None:
        ours = LatentDiffusionModel.from_pretrained(checkpoint, torch_dtype=dtype, device=device)
        # Components the benchmark does not use are passed as None, so directories without them load.
        pipe = StableDiffusionPipeline.from_pretrained(
            checkpoint, torch_dtype=dtype, tokenizer=ours.tokenizer, safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False, local_files_only=True)
        description = f"checkpoint {checkpoint}"
    else:
        torch.manual_seed(0)
        parts = _components(preset)
        pipe = StableDiffusionPipeline(**parts, tokenizer=None, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        unet = unet2d_condition_model(parts["unet"].config)
        unet.load_state_dict(parts["unet"].state_dict())
        ours = LatentDiffusionModel(parts["text_encoder"], unet, parts["vae"], copy.deepcopy(parts["scheduler"]))
        description = f"preset {preset} (random weights)"
    pipe.set_progress_bar_config(disable=True)
    return ours.to(device, dtype).eval(), pipe.to(device, dtype), description


def default_resolution(ours) -> int:
    return ours.unet.config.sample_size * ours.vae_scale_factor


def sides(ours, pipe, batch: int, resolution: int, steps: int, guidance: float,
          cuda_graph: bool = False) -> list[Side]:
    text = ours.text_encoder.config
    g = torch.Generator().manual_seed(0)
    shape = (batch, text.max_position_embeddings, text.hidden_size)
    cond, uncond = (torch.randn(shape, generator=g).to(ours.device, ours.dtype) for _ in range(2))
    common = dict(num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution)

    def run_ours(output_type):
        return ours.generate(cond, negative_prompt_embeds=uncond, output_type=output_type, progress=False,
                             cuda_graph=cuda_graph,
                             generator=torch.Generator(ours.device).manual_seed(1), **common)

    @torch.no_grad()
    def run_pipe(output_type):
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, output_type=output_type,
                    generator=torch.Generator(ours.device).manual_seed(1), **common).images

    return [Side("mmfast", run_ours), Side("diffusers StableDiffusionPipeline", run_pipe)]


def metrics(batch: int, steps: int, latent_s: float, image_s: float) -> dict:
    return {"it_per_s": steps / latent_s, "denoise_s": latent_s, "s_per_image": image_s / batch,
            "end_to_end_s": image_s}


def check_checkpoint(path: str | None) -> None:
    if path is not None and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"--checkpoint: {path} is not a diffusers pipeline directory (no model_index.json there)")
