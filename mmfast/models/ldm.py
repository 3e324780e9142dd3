"""A latent-diffusion model of the Stable Diffusion 1.5 family, assembled from mmfast parts.

- text encoder: transformers ``CLIPTextModel`` (mmfast has no family for the causal CLIP
  text tower yet, so it runs as it is);
- denoiser: diffusers ``UNet2DConditionModel`` built by :func:`mmfast.nn.unet2d_condition_model`
  (its ResNet and transformer blocks are mmfast modules; parameter names are diffusers',
  so the checkpoint loads key for key);
- VAE: diffusers ``AutoencoderKL`` (decode for the image, encode for image-to-image);
- sampler: the diffusers scheduler gives the schedule (``set_timesteps``, ``add_noise``)
  and an mmfast fused stepper (:mod:`mmfast.schedulers`) takes every step, classifier-free
  guidance included, in one pass.

``generate`` follows diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline``
draw for draw (same generator use, same order), so with the same seed the final latents
match the pipeline's.

``generate(..., cuda_graph=True)`` captures one denoising step in a CUDA graph (the fused
stepper's device-side schedule gives the timestep and coefficients) and replays it.

Syncs: none per step; image-to-image reads the input image's range once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmfast.models import _pipeline_dir as layout

TEXT_ENCODERS = ("CLIPTextModel",)
DENOISERS = ("UNet2DConditionModel",)
VAES = ("AutoencoderKL",)
OUTPUT_TYPES = ("latent", "pt")


def _declared_class(index: dict, name: str, config: dict) -> str:
    """The class a component declares: model_index.json's entry, else its config's."""
    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        return entry[1]
    declared = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if declared is None:
        raise ValueError(f"{name}: neither model_index.json nor its config says which class it is")
    return declared


def _check_supported(name: str, declared: str, supported: tuple[str, ...]) -> None:
    if declared not in supported:
        raise ValueError(f"{name}: unsupported architecture {declared!r} (mmfast's LatentDiffusionModel "
                         f"takes {', '.join(supported)})")


class LatentDiffusionModel(nn.Module):
    """Text encoder + UNet + VAE + fused sampler; see the module docstring.

    ``scheduler`` is a diffusers scheduler of a class mmfast fuses (DDIM, Euler discrete,
    DPM-Solver++ multistep, flow-match Euler); ``tokenizer`` is optional (without it,
    ``generate`` takes token ids or embeddings).
    """

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module, scheduler: Any,
                 tokenizer: Any = None):
        super().__init__()
        from mmfast.integrations.diffusers.schedulers import SUPPORTED

        if not any(c.__name__ in SUPPORTED for c in type(scheduler).__mro__):
            raise ValueError(f"scheduler: {type(scheduler).__name__} has no mmfast fused step "
                             f"(supported: {', '.join(SUPPORTED)})")
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._graph_cache: tuple | None = None  # (key, graph, body, stepper, static tensors)
        self._capture_graphs = True  # False: cuda_graph runs the graph's body eagerly (CPU tests)

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, local_dir, *, torch_dtype: torch.dtype | None = None, device=None,
                        variant: str | None = None) -> "LatentDiffusionModel":
        """Load a diffusers Stable Diffusion pipeline directory (``save_pretrained`` output):
        model_index.json, text_encoder/, unet/, vae/, scheduler/ and optionally tokenizer/.
        safetensors only (no pickle), local files only (no network). Missing components or
        files, unsupported classes and weights that do not fit a config raise errors naming
        them."""
        import diffusers
        import transformers

        from mmfast.integrations.diffusers.schedulers import SUPPORTED
        from mmfast.nn import unet2d_condition_model

        root = Path(local_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"local_dir: {root} is not a directory")
        index = layout.read_json(root / "model_index.json", "model_index.json")

        text_dir = layout.component_dir(root, "text_encoder")
        text_config = layout.read_json(text_dir / "config.json", "text_encoder")
        _check_supported("text_encoder", _declared_class(index, "text_encoder", text_config), TEXT_ENCODERS)
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(text_config))
        layout.load_weights(text_encoder, text_dir, variant)

        unet_dir = layout.component_dir(root, "unet")
        unet_config = layout.read_json(unet_dir / "config.json", "unet")
        _check_supported("unet", _declared_class(index, "unet", unet_config), DENOISERS)
        unet = unet2d_condition_model(unet_config)
        layout.load_weights(unet, unet_dir, variant)

        vae_dir = layout.component_dir(root, "vae")
        vae_config = layout.read_json(vae_dir / "config.json", "vae")
        _check_supported("vae", _declared_class(index, "vae", vae_config), VAES)
        vae = diffusers.AutoencoderKL.from_config(vae_config)
        layout.load_weights(vae, vae_dir, variant)

        scheduler_dir = layout.component_dir(root, "scheduler")
        scheduler_config = layout.read_json(scheduler_dir / "scheduler_config.json", "scheduler")
        scheduler_class = _declared_class(index, "scheduler", scheduler_config)
        _check_supported("scheduler", scheduler_class, SUPPORTED)
        scheduler = getattr(diffusers, scheduler_class).from_config(scheduler_config)

        tokenizer = None
        tokenizer_dir = layout.component_dir(root, "tokenizer", required=False)
        if tokenizer_dir is not None:
            tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)

        model = cls(text_encoder, unet, vae, scheduler, tokenizer).eval()
        if device is not None or torch_dtype is not None:
            model.to(**{k: v for k, v in (("device", device), ("dtype", torch_dtype)) if v is not None})
        return model

    # -- pieces ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

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
                             f"{_describe(input_ids)}")
        embeds = self.text_encoder(input_ids.to(self.device))[0]
        return embeds.to(self.dtype)

    @torch.no_grad()
    def encode_image(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of ``image`` [B, 3, H, W] with values in [0, 1] (one draw from
        the VAE's posterior, as diffusers' img2img does)."""
        self._check_image(image)
        return self._encode(image, generator)

    def _encode(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        pixels = image.to(device=self.device, dtype=self.vae.dtype) * 2 - 1
        latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        config = self.vae.config
        if getattr(config, "shift_factor", None) is not None:
            latents = latents - config.shift_factor
        return latents * config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] from scaled latents."""
        config = self.vae.config
        latents = latents.to(self.vae.dtype) / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            latents = latents + config.shift_factor
        image = self.vae.decode(latents).sample
        return (image / 2 + 0.5).clamp(0, 1)

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
        from tqdm.auto import tqdm

        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected a positive integer, got {num_inference_steps!r}")
        if image is None and strength is not None:
            raise ValueError("strength: only used for image-to-image (pass image=...)")
        if cuda_graph and self._capture_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graph: needs the model on a CUDA device, it is on {self.device}")
        if image is not None:
            self._check_image(image)

        cond = self._prompt_embeds(prompt_embeds, input_ids, prompt, "")
        batch = cond.shape[0]
        guided = guidance_scale > 1.0
        text = cond
        if guided:
            uncond = self._prompt_embeds(negative_prompt_embeds, negative_input_ids, None, "negative_")
            if uncond.shape[0] == 1 and batch > 1:  # one negative prompt for the whole batch
                uncond = uncond.expand(batch, -1, -1)
            if uncond.shape != cond.shape:
                raise ValueError(f"negative_prompt_embeds: shape {tuple(uncond.shape)} differs from the "
                                 f"prompt's {tuple(cond.shape)}")
            text = torch.cat([uncond, cond])

        scheduler, stepper, start = self._schedule(num_inference_steps, image, strength)
        timesteps = scheduler.timesteps[start:]
        if image is None:
            height, width = self._resolution(height, width)
            shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor,
                     width // self.vae_scale_factor)
            latents = _randn(shape, generator, self.device, self.dtype) * stepper.init_noise_sigma
        else:
            if height is not None or width is not None:
                raise ValueError("height/width: image-to-image takes the size of image; leave them out")
            latents = self._noised_image(image, batch, generator, scheduler, timesteps[:1])

        guidance = (guidance_scale, guidance_rescale) if guided else None
        if cuda_graph:
            latents = self._graphed_loop(latents, text, stepper, start, guidance, progress, self._capture_graphs)
        else:
            for t in tqdm(timesteps, disable=not progress, desc="denoising"):
                latents = self._denoise_step(latents, text, stepper, t, guidance)
        return latents if output_type == "latent" else self.decode_latents(latents)

    def _denoise_step(self, latents: Tensor, text: Tensor, stepper, timestep, guidance,
                      out: Tensor | None = None) -> Tensor:
        """One step: scale, UNet on [uncond; cond], guidance and the update fused. With
        ``timestep=None`` the stepper must be in device mode (the graph's body)."""
        model_input = stepper.scale_model_input(latents)
        if guidance is not None:
            model_input = torch.cat([model_input] * 2)
        if timestep is None:
            timestep = stepper.device_timestep()
        noise_pred = self.unet(model_input, timestep, encoder_hidden_states=text, return_dict=False)[0]
        scale, rescale = guidance if guidance is not None else (None, 0.0)
        return stepper.step(noise_pred, latents, guidance_scale=scale, guidance_rescale=rescale, out=out)

    def _graphed_loop(self, latents: Tensor, text: Tensor, stepper, start: int, guidance, progress: bool,
                      capture: bool = True) -> Tensor:
        """The denoising loop as one captured step replayed per step: the stepper reads its
        coefficients and timestep from a device table, so nothing changes between replays.
        The graph is kept for the next call with the same schedule, shapes and guidance
        (re-captured otherwise). ``capture=False`` runs the same body eagerly (for CPU tests)."""
        from tqdm.auto import tqdm

        key = (id(self.scheduler), tuple(stepper.timesteps), start, tuple(latents.shape), tuple(text.shape),
               latents.dtype, self.device, guidance, capture)
        cached = self._graph_cache
        if cached is None or cached[0] != key:
            self._graph_cache = None  # free the old graph's memory before capturing another
            stepper.use_device_schedule(self.device)
            static_latents, static_text = latents.clone(), text.clone()

            def body():
                self._denoise_step(static_latents, static_text, stepper, None, guidance, out=static_latents)

            graph = _capture(body) if capture else None
            cached = self._graph_cache = (key, graph, body, stepper, static_latents, static_text)
        _, graph, body, stepper, static_latents, static_text = cached
        stepper.reset(start)  # in place: the captured table and counter start over
        static_latents.copy_(latents)
        static_text.copy_(text)
        for _ in tqdm(range(len(stepper) - start), disable=not progress, desc="denoising (CUDA graph)"):
            graph.replay() if graph is not None else body()
        return static_latents.clone()

    def _prompt_embeds(self, embeds, input_ids, prompt, prefix: str) -> Tensor:
        given = [n for n, v in ((f"{prefix}prompt_embeds", embeds), (f"{prefix}input_ids", input_ids),
                                (f"{prefix}prompt", prompt)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"{given[0]}: give only one of {', '.join(given)}")
        if embeds is not None:
            if not isinstance(embeds, Tensor) or embeds.dim() != 3:
                raise ValueError(f"{prefix}prompt_embeds: expected a tensor [batch, tokens, dim], got "
                                 f"{_describe(embeds)}")
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

    def _schedule(self, steps: int, image, strength):
        """(scheduler, fused stepper, first step): img2img starts part-way, as diffusers'
        get_timesteps does."""
        from mmfast.integrations.diffusers.schedulers import fused_stepper

        scheduler = self.scheduler
        scheduler.set_timesteps(steps, device=self.device)
        start = 0
        if image is not None:
            strength = 0.8 if strength is None else strength
            if not 0.0 <= strength <= 1.0:
                raise ValueError(f"strength: expected a value in [0, 1], got {strength}")
            start = steps - min(int(steps * strength), steps)
            if start >= steps:
                raise ValueError(f"strength: {strength} with {steps} steps leaves no step to take")
            if hasattr(scheduler, "set_begin_index"):  # DDIM has no index state
                scheduler.set_begin_index(start * scheduler.order)
        stepper = fused_stepper(scheduler)
        stepper.reset(start)
        return scheduler, stepper, start

    def _resolution(self, height, width) -> tuple[int, int]:
        default = self.unet.config.sample_size * self.vae_scale_factor
        height = default if height is None else height
        width = default if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % self.vae_scale_factor:
                raise ValueError(f"{name}: {value!r} is not a positive multiple of the VAE's downsampling "
                                 f"factor {self.vae_scale_factor}")
        return height, width

    def _check_image(self, image) -> None:
        if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image: expected a tensor [batch, 3, height, width], got {_describe(image)}")
        if not image.is_floating_point():
            raise ValueError(f"image: expected floating point values in [0, 1], got dtype {image.dtype}")
        for name, size in (("height", image.shape[2]), ("width", image.shape[3])):
            if size % self.vae_scale_factor:
                raise ValueError(f"image: {name} {size} is not a multiple of the VAE's downsampling factor "
                                 f"{self.vae_scale_factor}")
        low, high = image.aminmax()  # one sync
        if low < 0 or high > 1:
            raise ValueError(f"image: values must lie in [0, 1], got [{float(low):.3g}, {float(high):.3g}]")

    def _noised_image(self, image: Tensor, batch: int, generator, scheduler, first_timestep: Tensor) -> Tensor:
        if image.shape[0] not in (1, batch):
            raise ValueError(f"image: batch {image.shape[0]} does not match the prompt batch {batch} (or 1)")
        latents = self._encode(image, generator).to(self.dtype)
        if latents.shape[0] != batch:
            latents = latents.expand(batch, *latents.shape[1:])
        noise = _randn(latents.shape, generator, self.device, self.dtype)
        return scheduler.add_noise(latents, noise, first_timestep.repeat(batch))


def _capture(body) -> "torch.cuda.CUDAGraph":
    """Warm ``body`` up on a side stream (kernels compile, buffers are allocated), then
    capture it; the warm-up's effect on the static tensors is undone by the caller."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def _randn(shape, generator: torch.Generator | None, device, dtype) -> Tensor:
    """torch.randn drawn on the generator's device, then moved (diffusers' randn_tensor)."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


__all__ = ["LatentDiffusionModel"]
