"""Wan 2.1 / 2.2 text-to-video, assembled from diffusers modules patched by mmfast.

- denoiser: diffusers ``WanTransformer3DModel`` patched with :func:`mmfast.patch` (the
  Wan family, mmfast.integrations.diffusers.wan_transformer: fused attention, q/k norms,
  rotary, modulation and gated residuals); parameter names are diffusers', so a checkpoint
  loads key for key and saves as diffusers' own. Wan 2.2 A14B's second expert
  (``transformer_2``, switched to below ``boundary_ratio`` of the training timesteps) is
  supported the same way;
- VAE: diffusers ``AutoencoderKLWan`` patched likewise (fused RMS norm + SiLU); the
  pipeline's ``latents_mean`` / ``latents_std`` un-normalise the latents before decoding;
- text encoder: transformers ``UMT5EncoderModel``, optional as SD3's T5-XXL is: without it
  (and its tokenizer) ``generate`` takes ``prompt_embeds`` [B, tokens, text_dim];
- sampler: the pipeline's scheduler. The published Wan pipelines use
  ``UniPCMultistepScheduler`` (flow prediction, flow sigmas): guidance, its corrector and
  predictor run in one fused pass (``guided_scheduler_step``; diffusers' own step without
  guidance); a ``FlowMatchEulerDiscreteScheduler`` or
  ``DPMSolverMultistepScheduler`` gets mmfast's fused guided step. ``cuda_graph=True``
  replays a whole step from a CUDA graph with a fused step (the machinery of
  :mod:`mmfast.models._latent_sampler`), else the denoiser call (UniPC's state,
  the previous sample and earlier predictions, lives in diffusers' scheduler, so its step
  runs between replays).

``generate`` follows diffusers' ``WanPipeline`` draw for draw: float32 initial noise of
shape [B, C, (frames - 1) / 4 + 1, H / 8, W / 8] (the VAE's factors), one denoiser pass per
step on [uncond; cond] (the pipeline runs two), ``noise_uncond + scale * (cond - uncond)``,
Wan 2.2 TI2V's per-token timesteps (``expand_timesteps``). So with the same seed the final
latents and decoded frames match the pipeline's.

Not covered: image-to-video (WanImageToVideoPipeline, TI2V's first-frame conditioning),
VACE, ``attention_kwargs`` / LoRA scales, callbacks.

Syncs: none per step (UniPC's step index and sigmas live on the host, set_begin_index(0) as
the pipeline does); with a second expert, one read-back before the loop of which steps it
takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmfast.models import _pipeline_dir as layout
from mmfast.models._latent_sampler import LatentSampler, capture_graph, describe, guided_batch, randn
from mmfast.models.checkpoint import register_architecture

PIPELINES = ("WanPipeline",)
DENOISERS = ("WanTransformer3DModel",)
VAES = ("AutoencoderKLWan",)
TEXT_ENCODERS = ("UMT5EncoderModel",)
TOKENIZERS = ("T5TokenizerFast", "T5Tokenizer", "AutoTokenizer")
# Schedulers whose fused stepper runs the whole step inside one CUDA graph (a schedule on the
# device), and the one the published pipelines use: UniPC, whose guided step is fused too but
# keeps its history in diffusers' scheduler, so it steps outside the graph.
GRAPH_STEP_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler")
SCHEDULERS = ("UniPCMultistepScheduler", *GRAPH_STEP_SCHEDULERS)


def _steps_in_graph(scheduler) -> bool:
    return any(c.__name__ in GRAPH_STEP_SCHEDULERS for c in type(scheduler).__mro__)


@register_architecture("WanPipeline")
class WanVideoModel(LatentSampler):
    """WanTransformer3DModel (+ optional second expert) + AutoencoderKLWan + scheduler +
    optional UMT5 text encoder and tokenizer; see the module docstring."""

    model_name = "WanVideoModel"

    def __init__(self, transformer: nn.Module, vae: nn.Module, scheduler: Any, text_encoder: nn.Module | None = None,
                 tokenizer: Any = None, transformer_2: nn.Module | None = None, boundary_ratio: float | None = None,
                 expand_timesteps: bool = False):
        super().__init__(vae, scheduler, SCHEDULERS)
        import mmfast

        if boundary_ratio is not None and not (isinstance(boundary_ratio, (int, float)) and 0 < boundary_ratio < 1):
            raise ValueError(f"boundary_ratio: expected None or a number in (0, 1), got {boundary_ratio!r}")
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("boundary_ratio: the second expert (transformer_2) and boundary_ratio come together")
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.boundary_ratio = boundary_ratio
        self.expand_timesteps = bool(expand_timesteps)
        # Per instance and reversible; the handles are kept so that a caller can undo them.
        self._patches = [mmfast.patch(m) for m in (transformer, transformer_2) if m is not None]
        self._prediction_graphs: dict = {}  # CUDA graphs of the guided denoiser call (schedulers without a fused step)

    def _prepare_vae(self, vae: nn.Module) -> nn.Module:
        import mmfast

        self._vae_patch = mmfast.patch(vae)  # AutoencoderKLWan: fused RMS norm + SiLU, in place
        return vae

    def _spatial_factor(self, vae: nn.Module) -> int:
        return vae.config.scale_factor_spatial

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, local_dir, *, torch_dtype: torch.dtype | None = None, device=None,
                        variant: str | None = None, text_encoder: bool = True) -> "WanVideoModel":
        """Load a diffusers ``WanPipeline`` directory (``save_pretrained`` output):
        model_index.json, transformer/, vae/, scheduler/, optionally transformer_2/,
        text_encoder/ (UMT5) and tokenizer/; its ``boundary_ratio`` and ``expand_timesteps``
        flags. ``text_encoder=False`` leaves UMT5 unloaded (prompt embeddings given).
        Floating weights go to ``torch_dtype`` except the modules diffusers keeps in float32
        (``_keep_in_fp32_modules``: the transformer's norms, modulation tables and time
        embedder), as its ``from_pretrained(torch_dtype=...)`` does. safetensors only, local files only. Missing components or files, unsupported
        classes and weights that do not fit a config raise errors naming them."""
        import diffusers
        import transformers

        root = Path(local_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"local_dir: {root} is not a directory")
        index = layout.read_json(root / "model_index.json", "model_index.json")
        pipeline = layout.pipeline_class(index)
        if pipeline is not None and pipeline not in PIPELINES:
            raise ValueError(f"model_index.json: pipeline class {pipeline!r} is not a Wan text-to-video pipeline "
                             f"({', '.join(PIPELINES)}); mmfast.models.from_pretrained picks the model for it")
        load = dict(model=cls.model_name, variant=variant)
        build_transformer = diffusers.WanTransformer3DModel.from_config

        def umt5(config):
            return transformers.UMT5EncoderModel(transformers.UMT5Config.from_dict(config))

        transformer = layout.load_component(root, index, "transformer", DENOISERS, build_transformer, **load)
        transformer_2 = layout.load_component(root, index, "transformer_2", DENOISERS, build_transformer,
                                              required=False, **load)
        vae = layout.load_component(root, index, "vae", VAES, diffusers.AutoencoderKLWan.from_config, **load)
        text_encoder = None if not text_encoder else layout.load_component(
            root, index, "text_encoder", TEXT_ENCODERS, umt5, required=False, **load)

        scheduler_dir = layout.component_dir(root, "scheduler")
        scheduler_config = layout.read_json(scheduler_dir / "scheduler_config.json", "scheduler")
        scheduler_class = layout.declared_class(index, "scheduler", scheduler_config)
        layout.check_supported("scheduler", scheduler_class, SCHEDULERS, cls.model_name)
        scheduler = getattr(diffusers, scheduler_class).from_config(scheduler_config)

        tokenizer = _load_tokenizer(root, index)
        model = cls(transformer, vae, scheduler, text_encoder, tokenizer, transformer_2,
                    boundary_ratio=index.get("boundary_ratio"),
                    expand_timesteps=bool(index.get("expand_timesteps", False))).eval()
        if device is not None:
            model.to(device)
        if torch_dtype is not None:
            _cast(model, torch_dtype)
        return model

    def save_pretrained(self, directory, *, max_shard_size: int | str = "5GB"):
        """Write a diffusers ``WanPipeline`` directory that diffusers and :meth:`from_pretrained`
        load (the patched modules keep diffusers' parameter names and save as diffusers' own)."""
        models = {"transformer": (self.transformer, "diffusers", DENOISERS[0]),
                  "transformer_2": (self.transformer_2, "diffusers", DENOISERS[0]),
                  "vae": (self.vae, "diffusers", VAES[0]),
                  "text_encoder": (self.text_encoder, "transformers", TEXT_ENCODERS[0])}
        return layout.save_pipeline(directory, PIPELINES[0], models, self.scheduler, {"tokenizer": self.tokenizer},
                                    max_shard_size=max_shard_size,
                                    extra={"boundary_ratio": self.boundary_ratio,
                                           "expand_timesteps": self.expand_timesteps})

    @classmethod
    def from_preset(cls, name: str, *, text_encoder: bool = True) -> "WanVideoModel":
        """A model of a named configuration with random weights ('wan-tiny', 'wan2.1-1.3b',
        'wan2.2-5b'; see :mod:`mmfast.models.wan_presets`); ``text_encoder=False`` leaves
        UMT5 out."""
        from mmfast.models.wan_presets import wan_components

        return cls(**wan_components(name, text_encoder=text_encoder)).eval()

    # -- pieces ---------------------------------------------------------------------------

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype (diffusers' ``transformer.dtype``, which skips the
        float32-kept modules): its patch embedding's."""
        return self.transformer.patch_embedding.weight.dtype

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size[1]

    @property
    def temporal_factor(self) -> int:
        return self.vae.config.scale_factor_temporal

    def _size_multiple(self) -> tuple[int, str]:
        factor, patch = self.vae_scale_factor, self.transformer.config.patch_size
        if patch[1] != patch[2]:
            raise ValueError(f"transformer: patch size {tuple(patch)} is not square along height and width")
        return factor * patch[1], (f"{factor * patch[1]} (the VAE's spatial factor {factor} times the "
                                   f"transformer's patch size {patch[1]})")

    def _video_shape(self, batch: int, num_frames, height, width) -> tuple[int, ...]:
        """The initial latents' shape; bad sizes are ValueErrors naming the argument."""
        temporal = self.temporal_factor
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 \
                or (num_frames - 1) % temporal:
            raise ValueError(f"num_frames: {num_frames!r} is not {temporal}k + 1 for an integer k >= 0 (the VAE "
                             f"encodes the first frame, then groups of {temporal})")
        multiple, why = self._size_multiple()
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"{name}: {value!r} is not a positive multiple of {why}")
        factor = self.vae_scale_factor
        return (batch, self.transformer.config.in_channels, (num_frames - 1) // temporal + 1, height // factor,
                width // factor)

    @torch.no_grad()
    def encode_text(self, prompt: str | list[str], max_sequence_length: int = 226) -> Tensor:
        """UMT5 embeddings [B, max_sequence_length, d_model] as WanPipeline computes them: the
        cleaned prompt padded to ``max_sequence_length``, the encoder's last hidden states
        with the positions after each prompt's tokens set to zero."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("prompt: this model has no text encoder or tokenizer; pass prompt_embeds")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt: expected a string or a list of strings, got {type(prompt).__name__}")
        tokens = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                                max_length=max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = self.text_encoder(ids, mask).last_hidden_state
        keep = (torch.arange(hidden.shape[1], device=device)[None, :] < mask.gt(0).sum(1)[:, None])
        return (hidden * keep[..., None]).to(device=self.device, dtype=self.dtype)

    # -- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 prompt_embeds: Tensor | None = None, negative_prompt_embeds: Tensor | None = None,
                 height: int = 480, width: int = 832, num_frames: int = 81, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, guidance_scale_2: float | None = None,
                 generator: torch.Generator | None = None, max_sequence_length: int = 226,
                 output_type: str = "latent", progress: bool = True, cuda_graph: bool = False) -> Tensor:
        """Text-to-video; returns the final latents (``output_type="latent"``, [B, C, F', H/8,
        W/8] for Wan 2.1) or frames in [0, 1] (``"pt"``, [B, num_frames, 3, height, width], as
        the pipeline's ``output_type="pt"``). Defaults are WanPipeline's.

        The prompt comes as ``prompt`` text (needs the text encoder and tokenizer) or
        ``prompt_embeds`` [B, tokens, text_dim]. Guidance runs when ``guidance_scale > 1``;
        the unconditional side is ``negative_prompt`` (default "") or
        ``negative_prompt_embeds`` (batch B or 1, the prompt's token count).
        ``guidance_scale_2``: the second expert's scale (default ``guidance_scale``).
        ``num_frames``: 4k + 1 (the VAE's temporal factor); ``height`` / ``width``: multiples
        of the VAE's spatial factor times the patch size (16 for Wan 2.1, 32 for Wan 2.2 5B);
        other sizes are ValueErrors (the pipeline rounds them with a warning).

        ``cuda_graph=True`` (CUDA only): with a fused-step scheduler and one expert, one whole
        denoising step (denoiser, guidance, update) is captured in a CUDA graph and replayed
        for every step; otherwise (UniPC, two experts) the guided denoiser call is (one graph
        per expert) and the scheduler's own step runs between replays. Graphs are kept for
        later calls with the same shapes and scales.
        """
        if output_type not in ("latent", "pt"):
            raise ValueError(f"output_type: expected 'latent' or 'pt', got {output_type!r}")
        steps = num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps: expected a positive integer, got {steps!r}")
        if guidance_scale_2 is not None and self.transformer_2 is None:
            raise ValueError("guidance_scale_2: only for a model with a second expert (transformer_2)")
        if cuda_graph and self._capture_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graph: needs the model on a CUDA device, it is on {self.device}")
        embeds = self._prompt(prompt_embeds, prompt, "", max_sequence_length)
        batch = embeds.shape[0]
        shape = self._video_shape(batch, num_frames, height, width)
        guided = guidance_scale > 1.0
        if guided:
            if negative_prompt_embeds is None:
                negative = "" if negative_prompt is None else negative_prompt
                negative_prompt = [negative] * batch if isinstance(negative, str) else negative
                if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != batch:
                    raise ValueError(f"negative_prompt: {len(negative_prompt)} prompts for a batch of {batch}")
            uncond = self._prompt(negative_prompt_embeds, negative_prompt, "negative_", max_sequence_length)
            embeds = guided_batch(embeds, uncond, "negative_prompt_embeds")
        scales = (guidance_scale, guidance_scale if guidance_scale_2 is None else guidance_scale_2)
        latents = self._denoise((embeds,), shape, scales if guided else None, steps, generator, progress, cuda_graph)
        return latents if output_type == "latent" else self.decode_latents(latents)

    def _denoise(self, cond: tuple[Tensor], shape, scales, steps: int, generator, progress: bool,
                 cuda_graph: bool) -> Tensor:
        from tqdm.auto import tqdm

        from mmfast.integrations.diffusers.schedulers import fused_stepper, guided_scheduler_step

        scheduler = self.scheduler
        scheduler.set_timesteps(steps, device=self.device)
        latents = randn(shape, generator, self.device, torch.float32)  # WanPipeline's noise is float32
        if _steps_in_graph(scheduler) and self.transformer_2 is None:
            stepper = fused_stepper(scheduler)
            stepper.reset(0)
            guidance = None if scales is None else (scales[0], 0.0)
            if cuda_graph:
                return self._graphed_loop(latents, cond, stepper, 0, guidance, progress, self._capture_graphs)
            for t in tqdm(scheduler.timesteps, disable=not progress, desc="denoising"):
                latents = self._denoise_step(latents, cond, stepper, t, guidance)
            return latents
        # The pipeline's loop with the scheduler's step (UniPC: guidance, corrector and
        # predictor in one fused pass; with cuda_graph the denoiser call is replayed from a
        # graph, the step runs after it); a second expert below the boundary.
        boundary = None if self.boundary_ratio is None else self.boundary_ratio * scheduler.config.num_train_timesteps
        predict = self._graphed_prediction if cuda_graph else self._predict
        scheduler.set_begin_index(0)
        # Which steps the second expert takes, read back once (not one sync per step).
        timesteps = scheduler.timesteps
        seconds = [False] * len(timesteps) if boundary is None else (timesteps < boundary).tolist()
        for t, second in zip(tqdm(timesteps, disable=not progress, desc="denoising"), seconds):
            model = self.transformer_2 if second else self.transformer
            scale = None if scales is None else scales[1 if second else 0]
            if scale is None:
                latents = scheduler.step(predict(latents, t, cond, model), t, latents, return_dict=False)[0]
            else:  # the denoiser on [uncond; cond] (the pipeline's two calls in one), guided in the step
                halves = predict(torch.cat([latents] * 2), t, cond, model).chunk(2)
                latents = guided_scheduler_step(scheduler, halves, t, latents, guidance_scale=scale,
                                                return_dict=False)[0]
        return latents

    def _graphed_prediction(self, model_input: Tensor, t: Tensor, cond: tuple[Tensor, ...],
                            model: nn.Module) -> Tensor:
        """:meth:`_predict` replayed from a CUDA graph (one per expert and shapes; kept for
        later calls): the inputs are copied into its static tensors, the scheduler's step
        then runs outside it. Without ``_capture_graphs`` the same body runs eagerly (CPU
        tests)."""
        key = (id(model), tuple(model_input.shape), model_input.dtype, t.dtype, tuple(tuple(c.shape) for c in cond),
               self.device, self._capture_graphs)
        entry = self._prediction_graphs.get(key)
        if entry is None:
            if len(self._prediction_graphs) >= 4:  # another size: free the old graphs first
                self._prediction_graphs.clear()
            static_latents, static_t = model_input.clone(), t.to(self.device).clone()
            static_cond = tuple(c.clone() for c in cond)
            out: dict[str, Tensor] = {}

            def body():
                out["prediction"] = self._predict(static_latents, static_t, static_cond, model)

            graph = capture_graph(body) if self._capture_graphs else None
            entry = self._prediction_graphs[key] = (graph, body, static_latents, static_t, static_cond, out)
        graph, body, static_latents, static_t, static_cond, out = entry
        static_latents.copy_(model_input)
        static_t.copy_(t)
        for static, given in zip(static_cond, cond):
            static.copy_(given)
        graph.replay() if graph is not None else body()
        return out["prediction"].clone()

    def _predict(self, model_input: Tensor, timestep: Tensor, cond: tuple[Tensor, ...],
                 model: nn.Module | None = None) -> Tensor:
        model = self.transformer if model is None else model
        model_input = model_input.to(model.patch_embedding.weight.dtype)
        batch = model_input.shape[0]
        if self.expand_timesteps:  # Wan 2.2 TI2V: one timestep per video token, float32 as the pipeline's mask
            frames, height, width = model_input.shape[2:]
            patch = model.config.patch_size
            tokens = frames * (height // patch[1]) * (width // patch[2])
            timestep = timestep.to(torch.float32).reshape(1, 1).expand(batch, tokens)
        else:
            timestep = timestep.reshape(-1)[:1].expand(batch)
        return model(hidden_states=model_input, timestep=timestep, encoder_hidden_states=cond[0],
                     return_dict=False)[0]

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Frames [B, F, 3, H, W] in [0, 1] from the denoiser's latents (the pipeline's
        ``latents / (1 / std) + mean``, then the VAE's decoder)."""
        config = self.vae.config
        latents = latents.to(self._vae_dtype)
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents.device,
                                                                                               latents.dtype)
        video = self.vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def _prompt(self, embeds, prompt, prefix: str, max_sequence_length: int) -> Tensor:
        if embeds is not None and prompt is not None:
            raise ValueError(f"{prefix}prompt_embeds: give only one of {prefix}prompt_embeds and {prefix}prompt")
        if embeds is None:
            if prompt is None:
                raise ValueError("prompt_embeds: give prompt_embeds or prompt")
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError(f"{prefix}prompt: this model has no text encoder or tokenizer; pass "
                                 f"{prefix}prompt_embeds")
            return self.encode_text(prompt, max_sequence_length)
        name = f"{prefix}prompt_embeds"
        if not isinstance(embeds, Tensor) or embeds.dim() != 3 or not embeds.is_floating_point():
            raise ValueError(f"{name}: expected a floating point tensor [batch, tokens, dim], got {describe(embeds)}")
        text_dim = self.transformer.config.text_dim
        if embeds.shape[-1] != text_dim:
            raise ValueError(f"{name}: last dimension {embeds.shape[-1]} is not the transformer's text_dim {text_dim}")
        return embeds.to(device=self.device, dtype=self.dtype)


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters and buffers to ``dtype``, but those under a name a component's
    class lists in ``_keep_in_fp32_modules`` stay float32 (diffusers' torch_dtype rule)."""
    for component in model.children():
        keep = getattr(component, "_keep_in_fp32_modules", None) or ()
        nn.Module.to(component, dtype=dtype)
        for name, sub in component.named_modules():
            if keep and any(part in keep for part in name.split(".")):
                nn.Module.to(sub, dtype=torch.float32)
        for name, param in component.named_parameters():  # a kept name may be a parameter (scale_shift_table)
            if keep and any(part in keep for part in name.split(".")):
                param.data = param.data.float()


def _load_tokenizer(root: Path, index: dict):
    """The optional tokenizer folder, loaded with the class model_index.json names."""
    import transformers

    if layout.saved_as_none(index, "tokenizer"):
        return None
    folder = layout.component_dir(root, "tokenizer", required=False)
    if folder is None:
        return None
    declared = layout.declared_class(index, "tokenizer", {"_class_name": TOKENIZERS[0]})
    layout.check_supported("tokenizer", declared, TOKENIZERS, WanVideoModel.model_name)
    return getattr(transformers, declared).from_pretrained(str(folder), local_files_only=True)


__all__ = ["WanVideoModel"]
