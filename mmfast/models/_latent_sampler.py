"""What the latent-diffusion models share (SD1.5's ``LatentDiffusionModel``, SD3's
``StableDiffusion3Model``): the VAE's way in and out (scaling and shift factors), image
and resolution checks, the image-to-image start part-way through the schedule, and the
denoising loop, driven from the host or replayed as a CUDA graph.

A subclass names its denoiser (:meth:`LatentSampler.denoiser`), evaluates it on a batch
(:meth:`LatentSampler._predict`), says where image-to-image starts
(:meth:`LatentSampler._first_step`) and turns prompts into the conditioning tensors that
:meth:`LatentSampler._sample` batches, guides and denoises with.

Syncs: none per step; image-to-image reads the input image's range once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

OUTPUT_TYPES = ("latent", "pt")


class LatentSampler(nn.Module):
    """Base class of the latent-diffusion models; see the module docstring.

    ``vae`` is a diffusers ``AutoencoderKL``; its ResNet blocks, mid-block attention and
    output norm become mmfast's, in place (:func:`mmfast.nn.use_mmfast_vae_blocks`).

    ``cond`` below is the tuple of conditioning tensors the denoiser takes, batched as
    [uncond; cond] when guided (SD1.5: text embeddings; SD3: text and pooled embeddings).
    """

    #: what the model is called in error messages
    model_name = "LatentSampler"
    #: image-to-image's strength when none is given (diffusers' default for the pipeline)
    default_strength = 0.8

    def __init__(self, vae: nn.Module, scheduler: Any, schedulers: tuple[str, ...]):
        super().__init__()
        if not any(c.__name__ in schedulers for c in type(scheduler).__mro__):
            raise ValueError(f"scheduler: {type(scheduler).__name__} has no mmfast fused step for "
                             f"{self.model_name} (supported: {', '.join(schedulers)})")
        self.vae = self._prepare_vae(vae)
        self.scheduler = scheduler
        self.vae_scale_factor = self._spatial_factor(vae)
        self._graph_cache: tuple | None = None  # (key, graph, body, stepper, static latents, static cond)
        self._capture_graphs = True  # False: cuda_graph runs the graph's body eagerly (CPU tests)

    # -- what a subclass provides -----------------------------------------------------------

    def _prepare_vae(self, vae: nn.Module) -> nn.Module:
        """The VAE on mmfast blocks (``AutoencoderKL``: in place, weights and names kept, so
        it still saves as diffusers'); a video model patches its own VAE class."""
        from mmfast.nn import use_mmfast_vae_blocks

        use_mmfast_vae_blocks(vae)
        return vae

    def _spatial_factor(self, vae: nn.Module) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def denoiser(self) -> nn.Module:
        raise NotImplementedError

    #: latent cells per denoiser token along each side (the transformer's patch size)
    patch_size = 1

    def _predict(self, model_input: Tensor, timestep: Tensor, cond: tuple[Tensor, ...]) -> Tensor:
        """The denoiser's output for ``model_input`` at ``timestep`` (0-d or [1])."""
        raise NotImplementedError

    def _first_step(self, steps: int, strength: float) -> int:
        """Where image-to-image starts in a schedule of ``steps`` (diffusers' get_timesteps)."""
        raise NotImplementedError

    # -- pieces ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def _vae_dtype(self) -> torch.dtype:
        """The VAE's first floating parameter's dtype: what diffusers' ``vae.dtype`` gives,
        without its walk over every module (a millisecond per image on a CPU)."""
        return next(p.dtype for p in self.vae.parameters() if p.is_floating_point())

    @torch.no_grad()
    def encode_image(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of ``image`` [B, 3, H, W] with values in [0, 1] (one draw from
        the VAE's posterior, as diffusers' img2img does)."""
        self._check_image(image)
        return self._encode(image, generator)

    def _encode(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        pixels = image.to(device=self.device, dtype=self._vae_dtype) * 2 - 1
        latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        config = self.vae.config
        if getattr(config, "shift_factor", None) is not None:
            latents = latents - config.shift_factor
        return latents * config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] from scaled latents."""
        config = self.vae.config
        latents = latents.to(self._vae_dtype) / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            latents = latents + config.shift_factor
        image = self.vae.decode(latents).sample
        return (image / 2 + 0.5).clamp(0, 1)

    def _size_multiple(self) -> tuple[int, str]:
        """(what image sides must be a multiple of, how to say why)."""
        factor = self.vae_scale_factor
        if self.patch_size == 1:
            return factor, f"the VAE's downsampling factor {factor}"
        return factor * self.patch_size, (f"{factor * self.patch_size} (the VAE's downsampling factor {factor} "
                                          f"times the denoiser's patch size {self.patch_size})")

    def _resolution(self, height, width) -> tuple[int, int]:
        default = self.denoiser.config.sample_size * self.vae_scale_factor
        height = default if height is None else height
        width = default if width is None else width
        multiple, why = self._size_multiple()
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"{name}: {value!r} is not a positive multiple of {why}")
        return height, width

    def _check_image(self, image) -> None:
        if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image: expected a tensor [batch, 3, height, width], got {describe(image)}")
        if not image.is_floating_point():
            raise ValueError(f"image: expected floating point values in [0, 1], got dtype {image.dtype}")
        multiple, why = self._size_multiple()
        for name, size in (("height", image.shape[2]), ("width", image.shape[3])):
            if size % multiple:
                raise ValueError(f"image: {name} {size} is not a multiple of {why}")
        low, high = image.aminmax()  # one sync
        if low < 0 or high > 1:
            raise ValueError(f"image: values must lie in [0, 1], got [{float(low):.3g}, {float(high):.3g}]")

    def _latent_size(self, height, width, image) -> tuple[int, int]:
        """The latents' (height, width): from height/width (or the default) for
        text-to-image, from the image for image-to-image."""
        if image is None:
            height, width = self._resolution(height, width)
        else:
            if height is not None or width is not None:
                raise ValueError("height/width: image-to-image takes the size of image; leave them out")
            height, width = image.shape[2:]
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    # -- sampling ---------------------------------------------------------------------------

    def _check_generate(self, output_type: str, steps, image, strength, cuda_graph: bool) -> None:
        """The checks every ``generate`` starts with (the image's range: one sync)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps: expected a positive integer, got {steps!r}")
        if image is None and strength is not None:
            raise ValueError("strength: only used for image-to-image (pass image=...)")
        if cuda_graph and self._capture_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graph: needs the model on a CUDA device, it is on {self.device}")
        if image is not None:
            self._check_image(image)

    def _sample(self, cond: tuple[Tensor, ...], batch: int, guidance, *, steps: int, latent_size: tuple[int, int],
                generator, image, strength, output_type: str, progress: bool, cuda_graph: bool,
                timestep_kwargs: dict | None = None) -> Tensor:
        """The shared body of ``generate``: schedule, initial latents (noise, or the noised
        image), the denoising loop, then latents or decoded images. ``guidance``: None or
        (scale, rescale), with ``cond`` then batched [uncond; cond]."""
        from tqdm.auto import tqdm

        scheduler, stepper, start = self._schedule(steps, image, strength, timestep_kwargs or {})
        timesteps = scheduler.timesteps[start:]
        if image is None:
            shape = (batch, self.denoiser.config.in_channels, *latent_size)
            latents = randn(shape, generator, self.device, self.dtype) * stepper.init_noise_sigma
        else:
            latents = self._noised_image(image, batch, generator, scheduler, timesteps[:1])

        if cuda_graph:
            latents = self._graphed_loop(latents, cond, stepper, start, guidance, progress, self._capture_graphs)
        else:
            for t in tqdm(timesteps, disable=not progress, desc="denoising"):
                latents = self._denoise_step(latents, cond, stepper, t, guidance)
        return latents if output_type == "latent" else self.decode_latents(latents)

    def _denoise_step(self, latents: Tensor, cond: tuple[Tensor, ...], stepper, timestep, guidance,
                      out: Tensor | None = None) -> Tensor:
        """One step: scale, the denoiser on [uncond; cond], guidance and the update fused.
        With ``timestep=None`` the stepper must be in device mode (the graph's body)."""
        model_input = stepper.scale_model_input(latents)
        if guidance is not None:
            model_input = torch.cat([model_input] * 2)
        if timestep is None:
            timestep = stepper.device_timestep()
        prediction = self._predict(model_input, timestep, cond)
        scale, rescale = guidance if guidance is not None else (None, 0.0)
        return stepper.step(prediction, latents, guidance_scale=scale, guidance_rescale=rescale, out=out)

    def _schedule(self, steps: int, image, strength, timestep_kwargs: dict):
        """(scheduler, fused stepper, first step): img2img starts part-way."""
        from mmfast.integrations.diffusers.schedulers import fused_stepper

        scheduler = self.scheduler
        scheduler.set_timesteps(steps, device=self.device, **timestep_kwargs)
        start = 0
        if image is not None:
            strength = self.default_strength if strength is None else strength
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
                raise ValueError(f"strength: expected a value in [0, 1], got {strength!r}")
            start = self._first_step(steps, strength)
            if start >= steps:
                raise ValueError(f"strength: {strength} with {steps} steps leaves no step to take")
            if hasattr(scheduler, "set_begin_index"):  # DDIM has no index state
                scheduler.set_begin_index(start * scheduler.order)
        stepper = fused_stepper(scheduler)
        stepper.reset(start)
        return scheduler, stepper, start

    def _noised_image(self, image: Tensor, batch: int, generator, scheduler, first_timestep: Tensor) -> Tensor:
        if image.shape[0] not in (1, batch):
            raise ValueError(f"image: batch {image.shape[0]} does not match the prompt batch {batch} (or 1)")
        latents = self._encode(image, generator).to(self.dtype)
        if latents.shape[0] != batch:
            latents = latents.expand(batch, *latents.shape[1:])
        noise = randn(latents.shape, generator, self.device, self.dtype)
        timestep = first_timestep.repeat(batch)
        if hasattr(scheduler, "scale_noise"):  # flow matching: interpolate towards the noise
            return scheduler.scale_noise(latents, timestep, noise)
        return scheduler.add_noise(latents, noise, timestep)

    def _graphed_loop(self, latents: Tensor, cond: tuple[Tensor, ...], stepper, start: int, guidance,
                      progress: bool, capture: bool = True) -> Tensor:
        """The denoising loop as one captured step replayed per step: the stepper reads its
        coefficients and timestep from a device table, so nothing changes between replays.
        The graph is kept for the next call with the same schedule, shapes and guidance
        (inputs are copied into its static tensors). ``capture=False`` runs the same body
        eagerly (for CPU tests)."""
        from tqdm.auto import tqdm

        key = (id(self.scheduler), tuple(stepper.timesteps), tuple(getattr(stepper, "sigmas", ())), start,
               tuple(latents.shape), tuple(tuple(c.shape) for c in cond), latents.dtype, self.device, guidance,
               capture)
        cached = self._graph_cache
        if cached is None or cached[0] != key:
            self._graph_cache = None  # free the old graph's memory before capturing another
            stepper.use_device_schedule(self.device)
            static_latents, static_cond = latents.clone(), tuple(c.clone() for c in cond)

            def body():
                self._denoise_step(static_latents, static_cond, stepper, None, guidance, out=static_latents)

            graph = capture_graph(body) if capture else None
            cached = self._graph_cache = (key, graph, body, stepper, static_latents, static_cond)
        _, graph, body, stepper, static_latents, static_cond = cached
        stepper.reset(start)  # in place: the captured table and counter start over
        static_latents.copy_(latents)
        for static, given in zip(static_cond, cond):
            static.copy_(given)
        for _ in tqdm(range(len(stepper) - start), disable=not progress, desc="denoising (CUDA graph)"):
            graph.replay() if graph is not None else body()
        return static_latents.clone()


def capture_graph(body) -> "torch.cuda.CUDAGraph":
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


def randn(shape, generator: torch.Generator | None, device, dtype) -> Tensor:
    """torch.randn drawn on the generator's device, then moved (diffusers' randn_tensor)."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def describe(value) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def guided_batch(cond: Tensor, uncond: Tensor, name: str) -> Tensor:
    """[uncond; cond] along the batch; a batch-1 ``uncond`` serves the whole batch. A
    shape that differs from the prompt's is an error naming ``name``."""
    if uncond.shape[0] == 1 and cond.shape[0] > 1:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
    if uncond.shape != cond.shape:
        raise ValueError(f"{name}: shape {tuple(uncond.shape)} differs from the prompt's {tuple(cond.shape)}")
    return torch.cat([uncond, cond])


__all__ = ["LatentSampler", "OUTPUT_TYPES"]
