"""A latent-diffusion model of the Stable Diffusion 1.5 family, assembled from mmfast parts.

- text encoder: :class:`mmfast.nn.text.TextTransformer`, the causal CLIP text tower on
  mmfast kernels (the names of transformers' ``CLIPTextModel``, so the checkpoint loads key
  for key; transformers 4 checkpoints' ``text_model.`` prefix is taken off);
- denoiser: diffusers ``UNet2DConditionModel`` built by :func:`mmfast.nn.unet2d_condition_model`
  (its ResNet and transformer blocks are mmfast modules; parameter names are diffusers',
  so the checkpoint loads key for key);
- VAE: diffusers ``AutoencoderKL`` with mmfast blocks (decode for the image, encode for image-to-image);
- sampler: the diffusers scheduler gives the schedule (``set_timesteps``, ``add_noise``)
  and an mmfast fused stepper (:mod:`mmfast.schedulers`) takes every step, classifier-free
  guidance included, in one pass.

``generate`` follows diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline``
draw for draw (same generator use, same order), so with the same seed the final latents
match the pipeline's.

``generate(..., cuda_graph=True)`` captures one denoising step in a CUDA graph (the fused
stepper's device-side schedule gives the timestep and coefficients) and replays it.
The loop, the VAE's way in and out and the checks are shared with the SD3 model
(:mod:`mmfast.models._latent_sampler`).

Syncs: none per step; image-to-image reads the input image's range once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmfast.models import _pipeline_dir as layout
from mmfast.models._latent_sampler import LatentSampler, describe, guided_batch
from mmfast.models.checkpoint import register_architecture

TEXT_ENCODERS = ("CLIPTextModel",)
DENOISERS = ("UNet2DConditionModel",)
VAES = ("AutoencoderKL",)
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")


@register_architecture("StableDiffusionPipeline")
@register_architecture("StableDiffusionImg2ImgPipeline")
class LatentDiffusionModel(LatentSampler):
    """Text encoder + UNet + VAE + fused sampler; see the module docstring.

    ``scheduler`` is a diffusers scheduler of a class mmfast fuses (DDIM, Euler discrete,
    DPM-Solver++ multistep, flow-match Euler); ``tokenizer`` is optional (without it,
    ``generate`` takes token ids or embeddings).
    """

    model_name = "LatentDiffusionModel"

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module, scheduler: Any,
                 tokenizer: Any = None):
        from mmfast.integrations.diffusers.schedulers import SUPPORTED

        super().__init__(vae, scheduler, SUPPORTED)
        self.text_encoder = text_encoder
        self.unet = unet
        self.tokenizer = tokenizer

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, local_dir, *, torch_dtype: torch.dtype | None = None, device=None,
                        variant: str | None = None) -> "LatentDiffusionModel":
        """Load a diffusers Stable Diffusion pipeline directory (``save_pretrained`` output):
        model_index.json, text_encoder/, unet/, vae/, scheduler/ and optionally tokenizer/.
        safetensors only (no pickle), local files only (no network). Missing components or
        files, unsupported classes and weights that do not fit a config raise errors naming
        them. A Stable Diffusion 3 directory loads as :class:`StableDiffusion3Model`."""
        import diffusers
        import transformers

        from mmfast.integrations.diffusers.schedulers import SUPPORTED
        from mmfast.nn import TextTransformer, unet2d_condition_model

        root = Path(local_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"local_dir: {root} is not a directory")
        index = layout.read_json(root / "model_index.json", "model_index.json")
        pipeline = layout.pipeline_class(index)
        if pipeline in SD3_PIPELINES:
            from mmfast.models.sd3 import StableDiffusion3Model

            return StableDiffusion3Model.from_pretrained(root, torch_dtype=torch_dtype, device=device,
                                                         variant=variant)
        if pipeline is not None and pipeline not in PIPELINES:
            raise ValueError(f"model_index.json: unsupported pipeline class {pipeline!r} (mmfast loads "
                             f"{', '.join(PIPELINES)} as LatentDiffusionModel and {', '.join(SD3_PIPELINES)} "
                             "as StableDiffusion3Model)")
        load = dict(model=cls.model_name, variant=variant)

        text_encoder = layout.load_component(
            root, index, "text_encoder", TEXT_ENCODERS,
            lambda config: TextTransformer.from_config(transformers.CLIPTextConfig.from_dict(config)), **load)
        unet = layout.load_component(root, index, "unet", DENOISERS, unet2d_condition_model, **load)
        vae = layout.load_component(root, index, "vae", VAES, diffusers.AutoencoderKL.from_config, **load)

        scheduler_dir = layout.component_dir(root, "scheduler")
        scheduler_config = layout.read_json(scheduler_dir / "scheduler_config.json", "scheduler")
        scheduler_class = layout.declared_class(index, "scheduler", scheduler_config)
        layout.check_supported("scheduler", scheduler_class, SUPPORTED, cls.model_name)
        scheduler = getattr(diffusers, scheduler_class).from_config(scheduler_config)

        tokenizer = None
        tokenizer_dir = layout.component_dir(root, "tokenizer", required=False)
        if tokenizer_dir is not None:
            tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)

        model = cls(text_encoder, unet, vae, scheduler, tokenizer).eval()
        if device is not None or torch_dtype is not None:
            model.to(**{k: v for k, v in (("device", device), ("dtype", torch_dtype)) if v is not None})
        return model

    def save_pretrained(self, directory, *, max_shard_size: int | str = "5GB"):
        """Write a diffusers ``StableDiffusionPipeline`` directory (model_index.json,
        text_encoder/, unet/, vae/, scheduler/, tokenizer/ when the model has one; safetensors,
        sharded at ``max_shard_size``) that diffusers and :meth:`from_pretrained` load. The
        UNet's mmfast blocks keep diffusers' parameter names, so it saves as diffusers' own."""
        models = {"text_encoder": (self.text_encoder, "transformers", TEXT_ENCODERS[0]),
                  "unet": (self.unet, "diffusers", DENOISERS[0]), "vae": (self.vae, "diffusers", VAES[0])}
        absent = {name: [None, None] for name in ("safety_checker", "feature_extractor", "image_encoder")}
        return layout.save_pipeline(directory, PIPELINES[0], models, self.scheduler, {"tokenizer": self.tokenizer},
                                    max_shard_size=max_shard_size, extra={**absent, "requires_safety_checker": False})

    # -- pieces ---------------------------------------------------------------------------

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    def tokenize(self, prompt: str | list[str]) -> Tensor:
        """Token ids [B, max_length] as diffusers pads them (needs the tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("prompt: this model was loaded without a tokenizer/ folder; "
                             "pass input_ids or prompt_embeds instead")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_text(self, input_ids: Tensor) -> Tensor:
        """CLIP text embeddings [B, tokens, dim] of ``input_ids`` [B, tokens] (no attention
        mask, as Stable Diffusion was trained)."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids: expected an integer tensor [batch, tokens], got "
                             f"{describe(input_ids)}")
        embeds = self.text_encoder(input_ids.to(self.device))[0]
        return embeds.to(self.dtype)

    # -- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_embeds: Tensor | None = None, input_ids: Tensor | None = None, *,
                 prompt: str | list[str] | None = None, negative_prompt_embeds: Tensor | None = None,
                 negative_input_ids: Tensor | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 generator: torch.Generator | None = None, height: int | None = None, width: int | None = None,
                 image: Tensor | None = None, strength: float | None = None, output_type: str = "latent",
                 progress: bool = True, cuda_graph: bool = False) -> Tensor:
        """Text-to-image, or image-to-image when ``image`` is given; returns the final
        latents (``output_type="latent"``, scaled as the UNet sees them) or images in [0, 1]
        (``"pt"``, [B, 3, H, W]).

        The prompt comes as ``prompt_embeds`` [B, tokens, dim], ``input_ids`` [B, tokens] or
        ``prompt`` text (needs the tokenizer). Guidance runs when ``guidance_scale > 1``; the
        unconditional side is ``negative_prompt_embeds``, ``negative_input_ids`` (batch B or
        1), or the empty prompt (needs the tokenizer). ``image``: [B or 1, 3, H, W] in [0, 1], noised to
        ``strength`` (default 0.8) of the schedule. ``progress``: show a tqdm bar.

        ``cuda_graph=True`` (CUDA only) captures one denoising step (UNet, guidance and the
        fused update, the timestep and coefficients read on the device) in a CUDA graph and
        replays it for every step; the graph is reused by later calls at the same
        resolution, batch, step count and guidance, and re-captured when those change.
        """
        self._check_generate(output_type, num_inference_steps, image, strength, cuda_graph)
        cond = self._prompt_embeds(prompt_embeds, input_ids, prompt, "")
        batch = cond.shape[0]
        guided = guidance_scale > 1.0
        text = cond
        if guided:
            uncond = self._prompt_embeds(negative_prompt_embeds, negative_input_ids, None, "negative_")
            text = guided_batch(cond, uncond, "negative_prompt_embeds")
        latent_size = self._latent_size(height, width, image)
        return self._sample((text,), batch, (guidance_scale, guidance_rescale) if guided else None,
                            steps=num_inference_steps, latent_size=latent_size, generator=generator, image=image,
                            strength=strength, output_type=output_type, progress=progress, cuda_graph=cuda_graph)

    def _predict(self, model_input: Tensor, timestep: Tensor, cond: tuple[Tensor, ...]) -> Tensor:
        return self.unet(model_input, timestep, encoder_hidden_states=cond[0], return_dict=False)[0]

    def _first_step(self, steps: int, strength: float) -> int:
        return steps - min(int(steps * strength), steps)

    def _prompt_embeds(self, embeds, input_ids, prompt, prefix: str) -> Tensor:
        given = [n for n, v in ((f"{prefix}prompt_embeds", embeds), (f"{prefix}input_ids", input_ids),
                                (f"{prefix}prompt", prompt)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"{given[0]}: give only one of {', '.join(given)}")
        if embeds is not None:
            if not isinstance(embeds, Tensor) or embeds.dim() != 3:
                raise ValueError(f"{prefix}prompt_embeds: expected a tensor [batch, tokens, dim], got "
                                 f"{describe(embeds)}")
            dim = self.unet.config.cross_attention_dim
            if embeds.shape[-1] != dim:
                raise ValueError(f"{prefix}prompt_embeds: last dimension {embeds.shape[-1]} is not the UNet's "
                                 f"cross_attention_dim {dim}")
            return embeds.to(device=self.device, dtype=self.dtype)
        if input_ids is not None:
            return self.encode_text(input_ids)
        if prefix:  # the unconditional side defaults to the empty prompt, as in diffusers
            if self.tokenizer is None:
                raise ValueError("negative_prompt_embeds: guidance_scale > 1 needs the unconditional side; "
                                 "without a tokenizer pass negative_prompt_embeds or negative_input_ids")
            return self.encode_text(self.tokenize([""]))
        if prompt is not None:
            return self.encode_text(self.tokenize(prompt))
        raise ValueError("prompt_embeds: give prompt_embeds, input_ids or prompt")


__all__ = ["LatentDiffusionModel"]
