"""A latent-diffusion model of the Stable Diffusion 3 family, assembled from mmfast parts.

- text encoders: two :class:`mmfast.nn.text.TextTransformerWithProjection` (CLIP-L, CLIP-G:
  the penultimate hidden states, concatenated, and the projected pooled outputs; the names
  of transformers' ``CLIPTextModelWithProjection``, so checkpoints load key for key) and
  an optional transformers ``T5EncoderModel`` (``text_encoder_3``; without it its tokens are
  zeros, as diffusers does), run as it is;
- denoiser: diffusers ``SD3Transformer2DModel`` built by :func:`mmfast.nn.sd3_transformer_model`
  (its MM-DiT blocks, SD3.5's q/k-normed and dual-attention ones included, and final adaLN
  are mmfast modules; parameter names are diffusers', so the checkpoint loads key for key);
- VAE: diffusers ``AutoencoderKL`` with mmfast blocks, SD3's scaling and shift factors;
- sampler: the ``FlowMatchEulerDiscreteScheduler`` gives the schedule (timestep shift,
  resolution-dependent ``mu`` when it shifts dynamically, ``scale_noise`` for
  image-to-image) and mmfast's fused flow-match stepper takes every step, classifier-free
  guidance included, in one pass.

``generate`` follows diffusers' ``StableDiffusion3Pipeline`` / ``StableDiffusion3Img2ImgPipeline``
draw for draw, so with the same seed the final latents match the pipeline's.
``generate(..., cuda_graph=True)`` captures one denoising step in a CUDA graph and replays
it (see :mod:`mmfast.models._latent_sampler`, shared with the SD1.5 model).

Not covered: skip-layer guidance (SD3.5), IP-Adapter, stochastic flow-match sampling.

Syncs: none per step; image-to-image reads the input image's range once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.models import _pipeline_dir as layout
from mmfast.models._latent_sampler import LatentSampler, describe, guided_batch
from mmfast.models.checkpoint import register_architecture

PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
CLIP_ENCODERS = ("CLIPTextModelWithProjection",)
T5_ENCODERS = ("T5EncoderModel",)
DENOISERS = ("SD3Transformer2DModel",)
VAES = ("AutoencoderKL",)
SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
T5_TOKENIZERS = ("T5TokenizerFast", "T5Tokenizer")


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """The dynamic-shifting ``mu`` for a number of image tokens: linear from ``base_shift``
    at ``base_seq_len`` tokens to ``max_shift`` at ``max_seq_len`` (as in diffusers)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


@register_architecture("StableDiffusion3Pipeline")
@register_architecture("StableDiffusion3Img2ImgPipeline")
class StableDiffusion3Model(LatentSampler):
    """Text encoders + MM-DiT transformer + VAE + fused flow-match sampler; see the module
    docstring. Tokenizers are optional (without them ``generate`` takes token ids or
    embeddings); ``text_encoder_3`` (T5) is optional."""

    model_name = "StableDiffusion3Model"
    default_strength = 0.6  # StableDiffusion3Img2ImgPipeline's

    def __init__(self, transformer: nn.Module, vae: nn.Module, scheduler: Any, text_encoder: nn.Module,
                 text_encoder_2: nn.Module, text_encoder_3: nn.Module | None = None, tokenizer: Any = None,
                 tokenizer_2: Any = None, tokenizer_3: Any = None):
        super().__init__(vae, scheduler, SCHEDULERS)
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.text_encoder_3 = text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, local_dir, *, torch_dtype: torch.dtype | None = None, device=None,
                        variant: str | None = None) -> "StableDiffusion3Model":
        """Load a diffusers Stable Diffusion 3 pipeline directory (``save_pretrained`` output):
        model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, scheduler/,
        optionally text_encoder_3/ (T5) and the tokenizers. safetensors only (no pickle),
        local files only (no network). Missing components or files, unsupported classes and
        weights that do not fit a config raise errors naming them."""
        import diffusers
        import transformers

        from mmfast.nn import TextTransformerWithProjection, sd3_transformer_model

        root = Path(local_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"local_dir: {root} is not a directory")
        index = layout.read_json(root / "model_index.json", "model_index.json")
        pipeline = layout.pipeline_class(index)
        if pipeline is not None and pipeline not in PIPELINES:
            raise ValueError(f"model_index.json: pipeline class {pipeline!r} is not a Stable Diffusion 3 pipeline "
                             f"({', '.join(PIPELINES)}); mmfast.models.from_pretrained picks the model for it")
        load = dict(model=cls.model_name, variant=variant)

        def clip(config):
            return TextTransformerWithProjection.from_config(transformers.CLIPTextConfig.from_dict(config))

        transformer = layout.load_component(root, index, "transformer", DENOISERS, sd3_transformer_model, **load)
        vae = layout.load_component(root, index, "vae", VAES, diffusers.AutoencoderKL.from_config, **load)
        text_encoder = layout.load_component(root, index, "text_encoder", CLIP_ENCODERS, clip, **load)
        text_encoder_2 = layout.load_component(root, index, "text_encoder_2", CLIP_ENCODERS, clip, **load)
        text_encoder_3 = layout.load_component(
            root, index, "text_encoder_3", T5_ENCODERS,
            lambda config: transformers.T5EncoderModel(transformers.T5Config.from_dict(config)), required=False,
            **load)

        scheduler_dir = layout.component_dir(root, "scheduler")
        scheduler_config = layout.read_json(scheduler_dir / "scheduler_config.json", "scheduler")
        scheduler_class = layout.declared_class(index, "scheduler", scheduler_config)
        layout.check_supported("scheduler", scheduler_class, SCHEDULERS, cls.model_name)
        scheduler = getattr(diffusers, scheduler_class).from_config(scheduler_config)

        tokenizers = [_load_tokenizer(root, index, name, kinds)
                      for name, kinds in (("tokenizer", CLIP_TOKENIZERS), ("tokenizer_2", CLIP_TOKENIZERS),
                                          ("tokenizer_3", T5_TOKENIZERS))]
        model = cls(transformer, vae, scheduler, text_encoder, text_encoder_2, text_encoder_3, *tokenizers).eval()
        if device is not None or torch_dtype is not None:
            model.to(**{k: v for k, v in (("device", device), ("dtype", torch_dtype)) if v is not None})
        return model

    def save_pretrained(self, directory, *, max_shard_size: int | str = "5GB"):
        """Write a diffusers ``StableDiffusion3Pipeline`` directory (model_index.json,
        transformer/, vae/, text_encoder/, text_encoder_2/, text_encoder_3/ when the model has
        T5, scheduler/, the tokenizers it has; safetensors, sharded at ``max_shard_size``) that
        diffusers and :meth:`from_pretrained` load. The transformer's mmfast blocks keep
        diffusers' parameter names, so it saves as diffusers' own."""
        models = {"transformer": (self.transformer, "diffusers", DENOISERS[0]), "vae": (self.vae, "diffusers", VAES[0]),
                  "text_encoder": (self.text_encoder, "transformers", CLIP_ENCODERS[0]),
                  "text_encoder_2": (self.text_encoder_2, "transformers", CLIP_ENCODERS[0]),
                  "text_encoder_3": (self.text_encoder_3, "transformers", T5_ENCODERS[0])}
        tokenizers = {"tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2, "tokenizer_3": self.tokenizer_3}
        absent = {name: [None, None] for name in ("image_encoder", "feature_extractor")}
        return layout.save_pipeline(directory, PIPELINES[0], models, self.scheduler, tokenizers,
                                    max_shard_size=max_shard_size, extra=absent)

    @classmethod
    def from_preset(cls, name: str, *, text_encoder_3: bool = True) -> "StableDiffusion3Model":
        """A model of a named configuration with random weights ('sd3-tiny', 'sd3-medium';
        see :mod:`mmfast.models.sd3_presets`); ``text_encoder_3=False`` leaves T5 out."""
        from mmfast.models.sd3_presets import sd3_components
        from mmfast.nn import TextTransformerWithProjection, sd3_transformer_model

        parts = sd3_components(name, text_encoder_3=text_encoder_3)
        transformer = sd3_transformer_model(parts.pop("transformer").config)  # its own random weights
        for clip in ("text_encoder", "text_encoder_2"):  # transformers' random weights, on mmfast's tower
            hf = parts[clip]
            parts[clip] = TextTransformerWithProjection.from_config(hf.config)
            parts[clip].load_state_dict(hf.state_dict())
        return cls(transformer, **parts).eval()

    # -- pieces ---------------------------------------------------------------------------

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    def tokenize(self, prompt: str | list[str], max_sequence_length: int = 256) -> tuple[Tensor, ...]:
        """Token ids for the two CLIP encoders (and T5 when the model has it), padded as
        diffusers pads them (needs the tokenizers)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if self.tokenizer is None or self.tokenizer_2 is None:
            raise ValueError("prompt: this model was loaded without tokenizer/ and tokenizer_2/ folders; "
                             "pass input_ids or prompt_embeds instead")
        length = self.tokenizer.model_max_length  # diffusers pads both CLIP prompts to the first's length
        ids = [t(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
               for t in (self.tokenizer, self.tokenizer_2)]
        if self.text_encoder_3 is not None:
            if self.tokenizer_3 is None:
                raise ValueError("prompt: the model has a T5 text encoder but was loaded without tokenizer_3/; "
                                 "pass input_ids or prompt_embeds instead")
            ids.append(self.tokenizer_3(prompts, padding="max_length", max_length=max_sequence_length,
                                        truncation=True, add_special_tokens=True, return_tensors="pt").input_ids)
        return tuple(ids)

    @torch.no_grad()
    def encode_text(self, input_ids: Tensor | Sequence[Tensor | None], *, clip_skip: int | None = None,
                    max_sequence_length: int = 256) -> tuple[Tensor, Tensor]:
        """(prompt embeddings [B, 77 + T5 tokens, joint_attention_dim], pooled embeddings
        [B, pooled dim]) as diffusers' encode_prompt makes them. ``input_ids``: the ids of
        both CLIP encoders (one tensor) or a sequence (CLIP-L ids, CLIP-G ids or None for
        the same, T5 ids: required with ``text_encoder_3``, refused without). Without T5,
        its ``max_sequence_length`` tokens are zeros."""
        return self._encode_ids(self._id_triple(input_ids, "input_ids"), clip_skip, max_sequence_length)

    def _encode_ids(self, ids: tuple[Tensor, Tensor, Tensor | None], clip_skip: int | None,
                    max_sequence_length: int) -> tuple[Tensor, Tensor]:
        clip_ids, clip_2_ids, t5_ids = ids
        embeds, pooled = zip(*(self._clip_embeds(encoder, ids, clip_skip) for encoder, ids in
                               ((self.text_encoder, clip_ids), (self.text_encoder_2, clip_2_ids))))
        clip_embeds, pooled = torch.cat(embeds, dim=-1), torch.cat(pooled, dim=-1)
        if self.text_encoder_3 is None:
            t5_embeds = torch.zeros(clip_ids.shape[0], max_sequence_length, self.transformer.config.joint_attention_dim,
                                    device=self.device, dtype=self.text_encoder.dtype)
        else:
            t5_embeds = self.text_encoder_3(t5_ids.to(self.device))[0].to(self.text_encoder_3.dtype)
        # diffusers pads the CLIP features to T5's width (a narrower T5 crops them: F.pad with a negative pad)
        clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        embeds = torch.cat([clip_embeds, t5_embeds], dim=-2)
        return embeds.to(self.dtype), pooled.to(self.dtype)

    def _clip_embeds(self, encoder: nn.Module, ids: Tensor, clip_skip: int | None) -> tuple[Tensor, Tensor]:
        out = encoder(ids.to(self.device), output_hidden_states=True)
        hidden = out.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)]
        return hidden.to(self.text_encoder.dtype), out[0]

    def _id_triple(self, input_ids, name: str) -> tuple[Tensor, Tensor, Tensor | None]:
        ids = list(input_ids) if isinstance(input_ids, (list, tuple)) else [input_ids]
        if not 1 <= len(ids) <= 3:
            raise ValueError(f"{name}: expected a tensor or a sequence of 1 to 3 tensors (CLIP-L, CLIP-G, T5), "
                             f"got {len(ids)} items")
        ids += [None] * (3 - len(ids))
        if ids[1] is None:
            ids[1] = ids[0]
        for i, t in enumerate(ids):
            if t is None and i == 2:
                continue
            if not isinstance(t, Tensor) or t.dim() != 2 or t.is_floating_point():
                raise ValueError(f"{name}[{i}]: expected an integer tensor [batch, tokens], got {describe(t)}")
            if t.shape[0] != ids[0].shape[0]:
                raise ValueError(f"{name}[{i}]: batch {t.shape[0]} differs from {name}[0]'s {ids[0].shape[0]}")
        if self.text_encoder_3 is not None and ids[2] is None:
            raise ValueError(f"{name}: the model has a T5 text encoder (text_encoder_3); pass its token ids as "
                             f"the third of {name}")
        if self.text_encoder_3 is None and ids[2] is not None:
            raise ValueError(f"{name}: T5 token ids were given but the model has no text_encoder_3")
        return ids[0], ids[1], ids[2]

    # -- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_embeds: Tensor | None = None, pooled_prompt_embeds: Tensor | None = None, *,
                 input_ids: Tensor | Sequence[Tensor | None] | None = None, prompt: str | list[str] | None = None,
                 negative_prompt_embeds: Tensor | None = None, negative_pooled_prompt_embeds: Tensor | None = None,
                 negative_input_ids: Tensor | Sequence[Tensor | None] | None = None,
                 negative_prompt: str | list[str] | None = None, num_inference_steps: int = 28,
                 guidance_scale: float = 7.0, generator: torch.Generator | None = None, height: int | None = None,
                 width: int | None = None, image: Tensor | None = None, strength: float | None = None,
                 mu: float | None = None, clip_skip: int | None = None, max_sequence_length: int = 256,
                 skip_guidance_layers: Sequence[int] | None = None, output_type: str = "latent",
                 progress: bool = True, cuda_graph: bool = False) -> Tensor:
        """Text-to-image, or image-to-image when ``image`` is given; returns the final
        latents (``output_type="latent"``, scaled as the transformer sees them) or images in
        [0, 1] (``"pt"``, [B, 3, H, W]).

        The prompt comes as ``prompt_embeds`` [B, tokens, joint_attention_dim] with
        ``pooled_prompt_embeds`` [B, pooled_projection_dim], as ``input_ids`` (see
        :meth:`encode_text`) or as ``prompt`` text (needs the tokenizers). Guidance runs when
        ``guidance_scale > 1``; the unconditional side is given the same ways with the
        ``negative_`` prefix (batch B or 1), else it is the empty prompt (needs the
        tokenizers). ``image``: [B or 1, 3, H, W] in [0, 1] (sides a multiple of the VAE's
        factor times the patch size), noised to ``strength`` (default 0.6) of the schedule.
        ``mu``: the dynamic-shifting parameter (computed from the resolution when the
        scheduler shifts dynamically and none is given). ``clip_skip`` applies to the
        prompt only, as in diffusers. ``progress``: a tqdm bar.

        ``cuda_graph=True`` (CUDA only) captures one denoising step (transformer, guidance
        and the fused update) in a CUDA graph and replays it for every step; the graph is
        reused by later calls with the same schedule, shapes and guidance.
        """
        if skip_guidance_layers is not None:
            raise NotImplementedError("skip_guidance_layers: skip-layer guidance (SD3.5) is not implemented by "
                                      "mmfast's StableDiffusion3Model; use diffusers' pipeline for it")
        if getattr(self.scheduler.config, "stochastic_sampling", False):
            raise NotImplementedError("scheduler: stochastic_sampling=True draws noise every step from the global "
                                      "RNG; mmfast's StableDiffusion3Model samples deterministically only")
        self._check_generate(output_type, num_inference_steps, image, strength, cuda_graph)
        text = dict(clip_skip=clip_skip, max_sequence_length=max_sequence_length)
        embeds, pooled = self._prompt(prompt_embeds, pooled_prompt_embeds, input_ids, prompt, "", **text)
        batch = embeds.shape[0]
        guided = guidance_scale > 1.0
        if guided:
            if negative_prompt is None and negative_input_ids is None and negative_prompt_embeds is None:
                if self.tokenizer is None or self.tokenizer_2 is None:
                    raise ValueError("negative_prompt_embeds: guidance_scale > 1 needs the unconditional side; "
                                     "without tokenizers pass negative_prompt_embeds with "
                                     "negative_pooled_prompt_embeds, or negative_input_ids")
                negative_prompt = [""] * batch  # diffusers' default negative prompt, one per prompt
            text["clip_skip"] = None  # diffusers encodes the negative prompt without clip_skip
            uncond, uncond_pooled = self._prompt(negative_prompt_embeds, negative_pooled_prompt_embeds,
                                                 negative_input_ids, negative_prompt, "negative_", **text)
            embeds = guided_batch(embeds, uncond, "negative_prompt_embeds")
            pooled = guided_batch(pooled, uncond_pooled, "negative_pooled_prompt_embeds")
        latent_size = self._latent_size(height, width, image)
        return self._sample((embeds, pooled), batch, (guidance_scale, 0.0) if guided else None,
                            steps=num_inference_steps, latent_size=latent_size, generator=generator, image=image,
                            strength=strength, output_type=output_type, progress=progress, cuda_graph=cuda_graph,
                            timestep_kwargs=self._timestep_kwargs(latent_size, mu))

    def _predict(self, model_input: Tensor, timestep: Tensor, cond: tuple[Tensor, ...]) -> Tensor:
        return self.transformer(hidden_states=model_input, timestep=timestep.expand(model_input.shape[0]),
                                encoder_hidden_states=cond[0], pooled_projections=cond[1], return_dict=False)[0]

    def _first_step(self, steps: int, strength: float) -> int:
        return int(max(steps - min(steps * strength, steps), 0))

    def _timestep_kwargs(self, latent_size: tuple[int, int], mu: float | None) -> dict:
        """set_timesteps' ``mu``: given, or from the image token count when the scheduler
        shifts dynamically (diffusers' calculate_shift with the scheduler's config)."""
        config = self.scheduler.config
        if mu is None and config.get("use_dynamic_shifting", None):
            tokens = (latent_size[0] // self.patch_size) * (latent_size[1] // self.patch_size)
            mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        return {} if mu is None else {"mu": mu}

    def _prompt(self, embeds, pooled, input_ids, prompt, prefix: str, **text) -> tuple[Tensor, Tensor]:
        given = [n for n, v in ((f"{prefix}prompt_embeds", embeds), (f"{prefix}input_ids", input_ids),
                                (f"{prefix}prompt", prompt)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"{given[0]}: give only one of {', '.join(given)}")
        if (embeds is None) != (pooled is None):
            missing = f"{prefix}pooled_prompt_embeds" if pooled is None else f"{prefix}prompt_embeds"
            raise ValueError(f"{missing}: {prefix}prompt_embeds and {prefix}pooled_prompt_embeds come together "
                             "(from the same text encoders)")
        if embeds is not None:
            return self._check_embeds(embeds, pooled, prefix)
        if input_ids is None and prompt is not None:
            input_ids = self.tokenize(prompt, text["max_sequence_length"])
        if input_ids is not None:
            return self._encode_ids(self._id_triple(input_ids, f"{prefix}input_ids"), text["clip_skip"],
                                    text["max_sequence_length"])
        raise ValueError("prompt_embeds: give prompt_embeds with pooled_prompt_embeds, input_ids or prompt")

    def _check_embeds(self, embeds, pooled, prefix: str) -> tuple[Tensor, Tensor]:
        config = self.transformer.config
        for name, value, dims, what, size in (
                (f"{prefix}prompt_embeds", embeds, 3, "[batch, tokens, dim]", config.joint_attention_dim),
                (f"{prefix}pooled_prompt_embeds", pooled, 2, "[batch, dim]", config.pooled_projection_dim)):
            if not isinstance(value, Tensor) or value.dim() != dims or not value.is_floating_point():
                raise ValueError(f"{name}: expected a floating point tensor {what}, got {describe(value)}")
            setting = "joint_attention_dim" if dims == 3 else "pooled_projection_dim"
            if value.shape[-1] != size:
                raise ValueError(f"{name}: last dimension {value.shape[-1]} is not the transformer's {setting} {size}")
        if pooled.shape[0] != embeds.shape[0]:
            raise ValueError(f"{prefix}pooled_prompt_embeds: batch {pooled.shape[0]} differs from "
                             f"{prefix}prompt_embeds' {embeds.shape[0]}")
        return (embeds.to(device=self.device, dtype=self.dtype), pooled.to(device=self.device, dtype=self.dtype))


def _load_tokenizer(root: Path, index: dict, name: str, kinds: tuple[str, ...]):
    """An optional tokenizer folder, loaded with the class model_index.json names."""
    import transformers

    if layout.saved_as_none(index, name):
        return None
    folder = layout.component_dir(root, name, required=False)
    if folder is None:
        return None
    declared = layout.declared_class(index, name, {"_class_name": kinds[0]})
    layout.check_supported(name, declared, kinds, StableDiffusion3Model.model_name)
    return getattr(transformers, declared).from_pretrained(str(folder), local_files_only=True)


__all__ = ["StableDiffusion3Model", "calculate_shift"]
