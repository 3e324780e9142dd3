"""FLUX.1 text-to-image (FLUX.1-dev, schnell) with mmfast's denoiser blocks and sampler.

- denoiser: diffusers ``FluxTransformer2DModel`` patched in place by mmfast's FLUX family
  (:mod:`mmfast.integrations.diffusers.flux_transformer`: joint attention with the rotary
  table in the kernel, fused adaLN-Zero blocks); parameter names are diffusers', so a
  checkpoint loads key for key;
- VAE: diffusers ``AutoencoderKL`` with mmfast blocks, FLUX's scaling and shift factors;
- sampler: ``FlowMatchEulerDiscreteScheduler`` gives the schedule (FluxPipeline's sigmas
  ``linspace(1, 1/N, N)`` and the resolution-dependent ``mu``) and mmfast's fused
  flow-match stepper takes every step, true classifier-free guidance included.

``generate`` follows diffusers' ``FluxPipeline`` draw for draw: the noise is drawn as
[B, C, H/8, W/8], packed into 2x2 patches (tokens of 4C channels), the image ids are
(0, row, column) per token, the text ids zeros, the timestep is ``t / 1000``, and the
guidance-distilled models (``guidance_embeds``) get ``guidance_scale`` as an embedding.
True CFG (``true_cfg_scale > 1`` with a negative prompt) runs both prompts in one batch
[negative; prompt]. With the same seed the final latents match the pipeline's.

Text encoders are not part of the model: ``generate`` takes ``prompt_embeds`` (T5
features, [B, tokens, joint_attention_dim]) and ``pooled_prompt_embeds`` (CLIP's pooled
output, [B, pooled_projection_dim]), e.g. from ``FluxPipeline.encode_prompt``.
``from_pretrained`` reads transformer/, vae/ and scheduler/ and leaves text_encoder/,
text_encoder_2/ (T5-XXL, 4.7B parameters) and the tokenizers on disk.

Not covered: image-to-image, inpainting, ControlNet, IP-Adapter, LoRA scales.

Syncs: none per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mmfast.models import _pipeline_dir as layout
from mmfast.models._latent_sampler import LatentSampler, describe, guided_batch, randn
from mmfast.models.checkpoint import register_architecture
from mmfast.models.sd3 import calculate_shift

SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


class PackedFlowSampler(LatentSampler):
    """What FLUX.1 and FLUX.2 share: 2x2-packed latent tokens, FluxPipeline's sigmas with a
    ``mu``, the denoising loop (host-driven or a CUDA graph) and the sides' checks. A
    subclass gives the noise's shape and packing, the ids, ``mu`` and ``_predict``."""

    #: latent cells per side of one token (the 2x2 packing)
    patch_size = 2
    #: the pipelines' default_sample_size: 128 latent cells, 1024 px with an 8x VAE
    default_sample_size = 128
    #: diffusers' pipeline classes this model loads (the first is what it is)
    pipelines: tuple[str, ...] = ()
    denoisers: tuple[str, ...] = ()
    vaes: tuple[str, ...] = ()

    def __init__(self, transformer: nn.Module, vae: nn.Module, scheduler: Any):
        super().__init__(vae, scheduler, SCHEDULERS)
        import mmfast

        handle = getattr(transformer, "_mmfast_patch_handle", None)
        if handle is None or not handle.active:
            mmfast.patch(transformer)  # in place, names kept: it still loads and saves as diffusers'
        self.transformer = transformer

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def _load_parts(cls, local_dir, variant: str | None) -> tuple[dict, dict]:
        """(model_index.json, {transformer, vae, scheduler}) of a pipeline directory."""
        import diffusers

        root = Path(local_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"local_dir: {root} is not a directory")
        index = layout.read_json(root / "model_index.json", "model_index.json")
        pipeline = layout.pipeline_class(index)
        if pipeline is not None and pipeline not in cls.pipelines:
            raise ValueError(f"model_index.json: pipeline class {pipeline!r} is not one {cls.model_name} loads "
                             f"({', '.join(cls.pipelines)}); mmfast.models.from_pretrained picks the model for it")
        load = dict(model=cls.model_name, variant=variant)

        def build(supported):  # one class each: load_component checked the declared one
            return lambda config: getattr(diffusers, supported[0]).from_config(config)

        parts = {"transformer": layout.load_component(root, index, "transformer", cls.denoisers,
                                                      build(cls.denoisers), **load),
                 "vae": layout.load_component(root, index, "vae", cls.vaes, build(cls.vaes), **load)}
        scheduler_dir = layout.component_dir(root, "scheduler")
        scheduler_config = layout.read_json(scheduler_dir / "scheduler_config.json", "scheduler")
        scheduler_class = layout.declared_class(index, "scheduler", scheduler_config)
        layout.check_supported("scheduler", scheduler_class, SCHEDULERS, cls.model_name)
        parts["scheduler"] = getattr(diffusers, scheduler_class).from_config(scheduler_config)
        return index, parts

    def _placed(self, torch_dtype, device):
        self.eval()
        if device is not None or torch_dtype is not None:
            self.to(**{k: v for k, v in (("device", device), ("dtype", torch_dtype)) if v is not None})
        return self

    # -- what a subclass gives ----------------------------------------------------------

    def _noise_shape(self, batch: int, latent_size: tuple[int, int]) -> tuple[int, ...]:
        raise NotImplementedError

    def _pack(self, noise: Tensor) -> Tensor:
        raise NotImplementedError

    def _unpack(self, latents: Tensor, latent_size: tuple[int, int]) -> Tensor:
        raise NotImplementedError

    # -- checks ---------------------------------------------------------------------------

    def _resolution(self, height, width) -> tuple[int, int]:
        default = self.default_sample_size * self.vae_scale_factor
        height = default if height is None else height
        width = default if width is None else width
        multiple, why = self._size_multiple()
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"{name}: {value!r} is not a positive multiple of {why}")
        return height, width

    def _check_embeds(self, value, name: str, dims: int, what: str, size: int, setting: str) -> Tensor:
        if not isinstance(value, Tensor) or value.dim() != dims or not value.is_floating_point():
            raise ValueError(f"{name}: expected a floating point tensor {what}, got {describe(value)}")
        if value.shape[-1] != size:
            raise ValueError(f"{name}: last dimension {value.shape[-1]} is not the transformer's {setting} {size}")
        return value.to(device=self.device, dtype=self.dtype)

    @staticmethod
    def _same_batch(value: Tensor, name: str, other: Tensor, other_name: str) -> None:
        if value.shape[0] != other.shape[0]:
            raise ValueError(f"{name}: batch {value.shape[0]} differs from the batch of {other_name} "
                             f"({other.shape[0]})")

    # -- sampling -------------------------------------------------------------------------

    def _flow_sample(self, cond: tuple[Tensor, ...], batch: int, guidance, *, steps: int, latent_size, generator,
                     sigmas, mu: float, output_type: str, progress: bool, cuda_graph: bool) -> Tensor:
        """The pipelines' loop: packed noise, the schedule with ``sigmas`` and ``mu``, a fused
        step per timestep (or the CUDA graph replayed), then unpacked latents or images."""
        from tqdm.auto import tqdm

        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / steps, steps)  # the pipelines' default
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        scheduler, stepper, _ = self._schedule(steps, None, None, {"sigmas": sigmas, "mu": mu})
        noise = randn(self._noise_shape(batch, latent_size), generator, self.device, self.dtype)
        latents = self._pack(noise)
        if cuda_graph:
            latents = self._graphed_loop(latents, cond, stepper, 0, guidance, progress, self._capture_graphs)
        else:
            for t in tqdm(scheduler.timesteps, disable=not progress, desc="denoising"):
                latents = self._denoise_step(latents, cond, stepper, t, guidance)
        latents = self._unpack(latents, latent_size)
        return latents if output_type == "latent" else self.decode_latents(latents)

    def _first_step(self, steps: int, strength: float) -> int:
        raise NotImplementedError(f"{self.model_name} is text-to-image only")

    def _sigmas(self, sigmas, steps: int):
        if sigmas is None:
            return None
        values = [float(s) for s in sigmas]
        if len(values) != steps:
            raise ValueError(f"sigmas: {len(values)} values for num_inference_steps={steps}")
        return values


def pack_2x2(latents: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: each 2x2 patch a token, channels before the
    patch offsets (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_2x2` for latents of ``height`` x ``width`` cells."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


@register_architecture("FluxPipeline")
class FluxModel(PackedFlowSampler):
    """FLUX.1 transformer (patched by mmfast) + VAE + fused flow-match sampler; see the
    module docstring. Takes prompt embeddings, not text."""

    model_name = "FluxModel"
    pipelines = ("FluxPipeline",)
    denoisers = ("FluxTransformer2DModel",)
    vaes = ("AutoencoderKL",)

    @classmethod
    def from_pretrained(cls, local_dir, *, torch_dtype: torch.dtype | None = None, device=None,
                        variant: str | None = None) -> "FluxModel":
        """Load a diffusers FluxPipeline directory (``save_pretrained`` output): its
        transformer/, vae/ and scheduler/ (safetensors only, local files only). The text
        encoders and tokenizers are not read. Missing components or files, unsupported
        classes and weights that do not fit a config raise errors naming them."""
        _, parts = cls._load_parts(local_dir, variant)
        return cls(**parts)._placed(torch_dtype, device)

    @classmethod
    def from_preset(cls, name: str) -> "FluxModel":
        """A model of a named configuration with random weights ('flux-tiny', 'flux.1-dev';
        see :mod:`mmfast.models.flux_presets`)."""
        from mmfast.models.flux_presets import flux_components, flux_preset

        if flux_preset(name)["generation"] != 1:
            raise ValueError(f"name: {name!r} is a FLUX.2 preset; build it with Flux2Model.from_preset")
        return cls(**flux_components(name)).eval()

    # -- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_embeds: Tensor, pooled_prompt_embeds: Tensor, *,
                 negative_prompt_embeds: Tensor | None = None, negative_pooled_prompt_embeds: Tensor | None = None,
                 num_inference_steps: int = 28, guidance_scale: float = 3.5, true_cfg_scale: float = 1.0,
                 generator: torch.Generator | None = None, height: int | None = None, width: int | None = None,
                 sigmas=None, output_type: str = "latent", progress: bool = True, cuda_graph: bool = False) -> Tensor:
        """Text-to-image from prompt embeddings; returns the final latents ([B, C, H/8, W/8],
        scaled as the transformer sees them, unpacked: what diffusers' ``_unpack_latents``
        makes of the pipeline's ``output_type="latent"``) or images in [0, 1] (``"pt"``).

        ``prompt_embeds`` [B, tokens, joint_attention_dim] (T5), ``pooled_prompt_embeds``
        [B, pooled_projection_dim] (CLIP). ``guidance_scale``: the embedded guidance of the
        guidance-distilled models (ignored by the others, as in diffusers). True CFG runs
        when ``true_cfg_scale > 1`` and negative embeddings are given (both, batch B or 1;
        as in diffusers, without them the scale is ignored). ``height``/``width``:
        multiples of 16 (VAE factor 8 times the 2x2 packing), default 1024. ``sigmas``:
        a custom schedule of ``num_inference_steps`` values. ``progress``: a tqdm bar.

        ``cuda_graph=True`` (CUDA only) captures one denoising step in a CUDA graph and
        replays it (see :mod:`mmfast.models._latent_sampler`).
        """
        self._check_generate(output_type, num_inference_steps, None, None, cuda_graph)
        config = self.transformer.config
        embeds = self._check_embeds(prompt_embeds, "prompt_embeds", 3, "[batch, tokens, dim]",
                                    config.joint_attention_dim, "joint_attention_dim")
        pooled = self._check_embeds(pooled_prompt_embeds, "pooled_prompt_embeds", 2, "[batch, dim]",
                                    config.pooled_projection_dim, "pooled_projection_dim")
        self._same_batch(pooled, "pooled_prompt_embeds", embeds, "prompt_embeds")
        batch = embeds.shape[0]
        has_negative = negative_prompt_embeds is not None or negative_pooled_prompt_embeds is not None
        guided = true_cfg_scale > 1 and has_negative
        if guided:
            if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
                missing = ("negative_prompt_embeds" if negative_prompt_embeds is None
                           else "negative_pooled_prompt_embeds")
                raise ValueError(f"{missing}: true CFG needs negative_prompt_embeds with "
                                 "negative_pooled_prompt_embeds")
            negative = self._check_embeds(negative_prompt_embeds, "negative_prompt_embeds", 3, "[batch, tokens, dim]",
                                          config.joint_attention_dim, "joint_attention_dim")
            negative_pooled = self._check_embeds(negative_pooled_prompt_embeds, "negative_pooled_prompt_embeds", 2,
                                                 "[batch, dim]", config.pooled_projection_dim, "pooled_projection_dim")
            embeds = guided_batch(embeds, negative, "negative_prompt_embeds")
            pooled = guided_batch(pooled, negative_pooled, "negative_pooled_prompt_embeds")
        latent_size = self._latent_size(height, width, None)
        rows, columns = latent_size[0] // 2, latent_size[1] // 2
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        image_ids = torch.zeros(rows, columns, 3)
        image_ids[..., 1] += torch.arange(rows)[:, None]
        image_ids[..., 2] += torch.arange(columns)[None, :]
        cond = (embeds, pooled, text_ids, image_ids.reshape(rows * columns, 3).to(self.device, self.dtype))
        if config.guidance_embeds:
            cond += (torch.full([embeds.shape[0]], guidance_scale, device=self.device, dtype=torch.float32),)
        mu = calculate_shift(rows * columns, *(self.scheduler.config.get(k, d) for k, d in (
            ("base_image_seq_len", 256), ("max_image_seq_len", 4096), ("base_shift", 0.5), ("max_shift", 1.15))))
        return self._flow_sample(cond, batch, (true_cfg_scale, 0.0) if guided else None, steps=num_inference_steps,
                                 latent_size=latent_size, generator=generator,
                                 sigmas=self._sigmas(sigmas, num_inference_steps), mu=mu, output_type=output_type,
                                 progress=progress, cuda_graph=cuda_graph)

    def _noise_shape(self, batch, latent_size):
        return (batch, self.transformer.config.in_channels // 4, *latent_size)

    def _pack(self, noise):
        return pack_2x2(noise)

    def _unpack(self, latents, latent_size):
        return unpack_2x2(latents, *latent_size)

    def _predict(self, model_input: Tensor, timestep: Tensor, cond: tuple[Tensor, ...]) -> Tensor:
        embeds, pooled, text_ids, image_ids, *guidance = cond
        # as FluxPipeline: the timestep in the latents' dtype, then / 1000
        timestep = timestep.expand(model_input.shape[0]).to(model_input.dtype) / 1000
        return self.transformer(hidden_states=model_input, timestep=timestep,
                                guidance=guidance[0] if guidance else None, pooled_projections=pooled,
                                encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids,
                                return_dict=False)[0]


__all__ = ["FluxModel", "PackedFlowSampler", "pack_2x2", "unpack_2x2"]
