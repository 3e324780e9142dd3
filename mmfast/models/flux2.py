"""FLUX.2 text-to-image (FLUX.2-dev, FLUX.2-klein) with mmfast's denoiser blocks and sampler.

- denoiser: diffusers ``Flux2Transformer2DModel`` patched in place by mmfast's FLUX.2 family
  (:mod:`mmfast.integrations.diffusers.flux2_transformer`); diffusers' parameter names;
- VAE: diffusers ``AutoencoderKLFlux2`` with mmfast blocks; its batch-norm statistics
  normalise the patchified latents;
- sampler: ``FlowMatchEulerDiscreteScheduler`` with the pipelines' sigmas and their
  empirical ``mu`` (a function of the image tokens and the step count), every step by
  mmfast's fused flow-match stepper, classifier-free guidance included.

``generate`` follows diffusers' ``Flux2KleinPipeline`` (and ``Flux2Pipeline`` for
FLUX.2-dev) draw for draw: noise drawn as [B, 4C, H/16, W/16] (already patchified),
flattened into tokens, 4-axis ids (t, h, w, l) for image and text tokens, ``t / 1000`` as
the timestep. Guidance as each pipeline does it: a transformer with ``guidance_embeds``
(FLUX.2-dev) gets ``guidance_scale`` as an embedding; otherwise (klein) classifier-free
guidance runs when ``guidance_scale > 1`` and the model is not step-distilled
(``is_distilled``, from model_index.json), on [negative; prompt] in one batch. The final
latents are unpatchified and de-normalised as the pipeline returns them
(``output_type="latent"``); with the same seed they match the pipeline's.

Text encoders (Qwen3 for klein, Mistral 3 for dev) are not part of the model: ``generate``
takes ``prompt_embeds`` [B, tokens, joint_attention_dim] (the pipelines' stacked hidden
states). Not covered: reference images (editing), the KV-cache pipeline, caption upsampling.

Syncs: none per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast.models._latent_sampler import guided_batch
from mmfast.models.checkpoint import register_architecture
from mmfast.models.flux import PackedFlowSampler


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's shift ``mu`` (diffusers' compute_empirical_mu): linear in the step count
    between fits at 10 and 200 steps, each linear in the image tokens; above 4300 tokens
    the 200-step fit alone."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    at_200, at_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    slope = (at_200 - at_10) / 190.0
    intercept = at_200 - 200.0 * slope
    return float(slope * num_steps + intercept)


@register_architecture("Flux2Pipeline")
@register_architecture("Flux2KleinPipeline")
class Flux2Model(PackedFlowSampler):
    """FLUX.2 transformer (patched by mmfast) + VAE + fused flow-match sampler; see the
    module docstring. Takes prompt embeddings, not text."""

    model_name = "Flux2Model"
    pipelines = ("Flux2KleinPipeline", "Flux2Pipeline")
    denoisers = ("Flux2Transformer2DModel",)
    vaes = ("AutoencoderKLFlux2",)

    def __init__(self, transformer, vae, scheduler, *, is_distilled: bool = False):
        super().__init__(transformer, vae, scheduler)
        self.is_distilled = bool(is_distilled)

    @classmethod
    def from_pretrained(cls, local_dir, *, torch_dtype: torch.dtype | None = None, device=None,
                        variant: str | None = None) -> "Flux2Model":
        """Load a diffusers Flux2KleinPipeline or Flux2Pipeline directory: transformer/,
        vae/, scheduler/ and klein's ``is_distilled`` flag (safetensors only, local files
        only). The text encoder and tokenizer are not read."""
        index, parts = cls._load_parts(local_dir, variant)
        distilled = index.get("is_distilled", False)
        if not isinstance(distilled, bool):
            raise ValueError(f"model_index.json: is_distilled must be true or false, got {distilled!r}")
        return cls(**parts, is_distilled=distilled)._placed(torch_dtype, device)

    @classmethod
    def from_preset(cls, name: str) -> "Flux2Model":
        """A model of a named configuration with random weights ('flux2-tiny',
        'flux.2-klein'; see :mod:`mmfast.models.flux_presets`)."""
        from mmfast.models.flux_presets import flux_components, flux_preset

        preset = flux_preset(name)
        if preset["generation"] != 2:
            raise ValueError(f"name: {name!r} is a FLUX.1 preset; build it with FluxModel.from_preset")
        return cls(**flux_components(name), is_distilled=preset.get("is_distilled", False)).eval()

    @property
    def _classifier_free(self) -> bool:
        """Whether ``guidance_scale`` means CFG (klein) rather than an embedding (dev)."""
        return not self.transformer.config.guidance_embeds

    @torch.no_grad()
    def generate(self, prompt_embeds: Tensor, *, negative_prompt_embeds: Tensor | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 4.0, generator: torch.Generator | None = None,
                 height: int | None = None, width: int | None = None, sigmas=None, output_type: str = "latent",
                 progress: bool = True, cuda_graph: bool = False) -> Tensor:
        """Text-to-image from prompt embeddings [B, tokens, joint_attention_dim]; returns the
        final latents [B, C, H/8, W/8] as the pipeline's ``output_type="latent"`` gives
        them, or images in [0, 1] (``"pt"``). ``guidance_scale``: the embedded guidance of
        FLUX.2-dev, or klein's CFG scale (CFG when > 1 on a model that is not step-distilled;
        it then needs ``negative_prompt_embeds``, batch B or 1, the pipeline's encoding of
        the empty prompt). ``height``/``width``: multiples of 16, default 1024.
        ``cuda_graph=True`` (CUDA only) replays one captured denoising step."""
        self._check_generate(output_type, num_inference_steps, None, None, cuda_graph)
        config = self.transformer.config
        embeds = self._check_embeds(prompt_embeds, "prompt_embeds", 3, "[batch, tokens, dim]",
                                    config.joint_attention_dim, "joint_attention_dim")
        batch = embeds.shape[0]
        guided = self._classifier_free and guidance_scale > 1 and not self.is_distilled
        if guided:
            if negative_prompt_embeds is None:
                raise ValueError("negative_prompt_embeds: guidance_scale > 1 on a model that is not step-distilled "
                                 "runs classifier-free guidance; pass the embeddings of the negative (empty) prompt")
            negative = self._check_embeds(negative_prompt_embeds, "negative_prompt_embeds", 3, "[batch, tokens, dim]",
                                          config.joint_attention_dim, "joint_attention_dim")
            embeds = guided_batch(embeds, negative, "negative_prompt_embeds")
        elif negative_prompt_embeds is not None:
            raise ValueError("negative_prompt_embeds: not used here (classifier-free guidance runs only with "
                             "guidance_scale > 1 on a klein model that is not step-distilled)")
        latent_size = self._latent_size(height, width, None)
        rows, columns = latent_size[0] // 2, latent_size[1] // 2
        # (t, h, w, l) coordinates: text tokens along l, image tokens on the (h, w) grid
        zero = torch.arange(1)
        text_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(embeds.shape[1]))
        image_ids = torch.cartesian_prod(zero, torch.arange(rows), torch.arange(columns), zero)
        cond = (embeds, text_ids.to(self.device), image_ids.to(self.device))
        if config.guidance_embeds:
            cond += (torch.full([embeds.shape[0]], guidance_scale, device=self.device, dtype=torch.float32),)
        mu = compute_empirical_mu(rows * columns, num_inference_steps)
        return self._flow_sample(cond, batch, (guidance_scale, 0.0) if guided else None, steps=num_inference_steps,
                                 latent_size=latent_size, generator=generator,
                                 sigmas=self._sigmas(sigmas, num_inference_steps), mu=mu, output_type=output_type,
                                 progress=progress, cuda_graph=cuda_graph)

    def _noise_shape(self, batch, latent_size):
        return (batch, self.transformer.config.in_channels, latent_size[0] // 2, latent_size[1] // 2)

    def _pack(self, noise):
        b, c, h, w = noise.shape
        return noise.reshape(b, c, h * w).permute(0, 2, 1).contiguous()

    def _unpack(self, latents, latent_size):
        """Tokens -> patchified grid, the VAE's batch-norm statistics undone, 2x2 patches
        back to cells (Flux2KleinPipeline's end of the loop)."""
        b, _, channels = latents.shape
        rows, columns = latent_size[0] // 2, latent_size[1] // 2
        grid = latents.transpose(1, 2).reshape(b, channels, rows, columns)
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(grid.device, grid.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(grid.device, grid.dtype)
        grid = grid * std + mean
        cells = grid.reshape(b, channels // 4, 2, 2, rows, columns).permute(0, 1, 4, 2, 5, 3)
        return cells.reshape(b, channels // 4, rows * 2, columns * 2)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] from the final latents (no scaling: the batch-norm
        statistics were undone already)."""
        image = self.vae.decode(latents.to(self._vae_dtype)).sample
        return (image / 2 + 0.5).clamp(0, 1)

    def _predict(self, model_input: Tensor, timestep: Tensor, cond: tuple[Tensor, ...]) -> Tensor:
        embeds, text_ids, image_ids, *guidance = cond
        timestep = timestep.expand(model_input.shape[0]).to(model_input.dtype) / 1000
        return self.transformer(hidden_states=model_input, timestep=timestep,
                                guidance=guidance[0] if guidance else None, encoder_hidden_states=embeds,
                                txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]


__all__ = ["Flux2Model", "compute_empirical_mu"]
