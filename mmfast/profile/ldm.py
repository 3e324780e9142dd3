"""The latent-diffusion workload: mmfast's ``LatentDiffusionModel`` (SD1.5 family) or
``StableDiffusion3Model`` and diffusers' ``StableDiffusionPipeline`` or
``StableDiffusion3Pipeline`` over the same components and weights (the pipeline runs the
original diffusers UNet / SD3 transformer and VAE; mmfast's are rebuilt with mmfast blocks
and loaded from their state dicts). Text encoders are the same modules on both sides.

Both sides take the same prompt embeddings (text encoding is the identical transformers
text models on both sides, so it is left out). One call per sample gives both figures: end
to end is the whole call, denoising (it/s) the part before the VAE's decoder starts (a
one-shot pre-hook on each side's ``vae.decoder`` stamps it), so denoising <= end to end.

Presets (random weights): ``tiny`` (a CPU runs it in well under a second) and ``sd15``,
the Stable Diffusion 1.5 component configs (UNet, VAE, CLIP ViT-L/14 text encoder) with
an Euler discrete scheduler; ``sd3-tiny``, ``sd3-medium``, ``sd35-medium`` and ``sd35-large``
(:mod:`mmfast.models.sd3_presets`),
built without T5-XXL: the prompt embeddings are given, so T5 would only take memory, and
their 256 T5 tokens are part of the embeddings as in diffusers. The issue's speed target
is for SD1.5; SD3 is reported the same way.

FLUX presets and checkpoints (``flux-*``) are built and run here with
:mod:`mmfast.profile.ldm_flux`'s parts. Wan text-to-video presets and checkpoints (``wan-*``,
a WanPipeline directory) run in :mod:`mmfast.profile.ldm_wan`, which has this module's
interface: :func:`workload` picks the module by preset prefix or the checkpoint's pipeline
class.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from mmfast.profile import build_progress, ldm_flux, ldm_wan
from mmfast.profile.measure import building_on, on_first_call, timed
from mmfast.profile.stats import figure

PRESETS = ("tiny", "sd15", "sd3-tiny", "sd3-medium", "sd35-medium", "sd35-large", *ldm_flux.PRESETS,
           *ldm_wan.PRESETS)
T5_TOKENS = 256  # diffusers' default max_sequence_length: the T5 part of SD3's prompt embeddings
_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1)


def prefix(preset: str | None) -> str:
    """The model family of a preset: 'sd3', 'flux1', 'flux2', 'wan' or '' (SD1.5);
    preflight offers a smaller preset of the same one."""
    if ldm_flux.owns(preset):
        return ldm_flux.family(preset)
    return next((p for p in ("sd3", ldm_wan.PREFIX) if (preset or "").startswith(p)), "")


def workload(preset: str | None, checkpoint: str | None):
    """The module that builds, runs and reports this preset or checkpoint (this one, or
    :mod:`mmfast.profile.ldm_wan` for Wan)."""
    if prefix(preset) == ldm_wan.PREFIX or ldm_wan.is_wan_checkpoint(checkpoint):
        return ldm_wan
    return sys.modules[__name__]


def fill_defaults(args, on_gpu: bool) -> None:
    """The workload's own defaults (steps, guidance, frames) before the generic ones."""
    work = workload(args.preset, args.checkpoint)
    if work is not ldm_wan and getattr(args, "frames", None) is not None:
        raise ValueError(f"--frames: only for Wan presets and checkpoints (a video), not {args.preset or 'this one'}")
    if work is not sys.modules[__name__]:
        work.fill_defaults(args, on_gpu)
        return
    own = defaults(args.preset, args.checkpoint)
    for name, values in own.items():
        if getattr(args, name, None) is None:
            setattr(args, name, values[0 if on_gpu else 1])


@dataclass
class Side:
    name: str
    # (output type "latent" or "pt", decode_start) -> output; decode_start(), when given, is
    # called once, as the VAE's decoder starts
    generate: Callable[..., object]


def _components(preset: str, scheduler: bool = True) -> dict:
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
        # CLIP's bos/eos are the vocabulary's last two ids (49406, 49407 of 49408): here of 100.
        text = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=8, bos_token_id=98, eos_token_id=99,
                              pad_token_id=1)
    else:  # the configs of stable-diffusion-v1-5's unet/, vae/ and text_encoder/
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            latent_channels=4)
        text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                              projection_dim=768)
    return {"unet": unet, "vae": vae, "text_encoder": CLIPTextModel(text),
            "scheduler": EulerDiscreteScheduler(**_SCHEDULE) if scheduler else None}


def preset_modules(preset: str) -> dict:
    """The modules of a preset's pipeline with random weights (diffusers and transformers
    modules; SD3 presets without T5-XXL), without its scheduler: build them on the meta
    device to count parameters (the SD1.5 scheduler moves a table to the CPU)."""
    if ldm_flux.owns(preset):
        return ldm_flux.preset_modules(preset)
    if prefix(preset) == ldm_wan.PREFIX:
        return ldm_wan.preset_modules(preset)
    if preset.startswith("sd3"):
        from mmfast.models.sd3_presets import sd3_components

        return {name: part for name, part in sd3_components(preset, text_encoder_3=False).items()
                if isinstance(part, torch.nn.Module)}
    return {name: part for name, part in _components(preset, scheduler=False).items() if part is not None}


def build(preset: str, checkpoint: str | None, device: torch.device, dtype: torch.dtype,
          phases: dict[str, int] | None = None):
    """(mmfast LatentDiffusionModel or StableDiffusion3Model, the diffusers pipeline, description).
    ``phases``: the estimate's parameters per build phase; a large model shows a progress bar."""
    import copy

    from diffusers import StableDiffusionPipeline

    from mmfast.models import LatentDiffusionModel, StableDiffusion3Model
    from mmfast.nn import unet2d_condition_model

    if ldm_flux.owns(preset) or ldm_flux.checkpoint_index(checkpoint) is not None:
        return ldm_flux.build(preset, checkpoint, device, dtype, phases)
    if checkpoint is not None:
        ours = LatentDiffusionModel.from_pretrained(checkpoint, torch_dtype=dtype, device=device)  # SD3 too
        if isinstance(ours, StableDiffusion3Model):
            pipe = _sd3_pipeline(checkpoint, ours, dtype)
        else:
            # Components the benchmark does not use are passed as None, so directories without them load.
            pipe = StableDiffusionPipeline.from_pretrained(
                checkpoint, torch_dtype=dtype, tokenizer=ours.tokenizer, safety_checker=None, feature_extractor=None,
                image_encoder=None, requires_safety_checker=False, local_files_only=True)
        description = f"checkpoint {checkpoint}"
    elif preset.startswith("sd3"):
        with building_on(device, dtype), build_progress.building(phases, preset) as progress:
            ours, pipe = _sd3_preset(preset, progress)
        description = f"preset {preset} (random weights, without T5-XXL)"
    else:
        torch.manual_seed(0)
        with building_on(device, dtype), build_progress.building(phases, preset) as progress:
            progress.phase("diffusers components")
            parts = _components(preset)
            pipe = StableDiffusionPipeline(**parts, tokenizer=None, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
            progress.phase("mmfast denoiser")
            unet = unet2d_condition_model(parts["unet"].config)
            unet.load_state_dict(parts["unet"].state_dict())
            progress.phase("mmfast VAE")
            # The model swaps its VAE's blocks in place: it gets a copy, the pipeline keeps diffusers' own.
            ours = LatentDiffusionModel(parts["text_encoder"], unet, copy.deepcopy(parts["vae"]),
                                        copy.deepcopy(parts["scheduler"]))
        description = f"preset {preset} (random weights)"
    pipe.set_progress_bar_config(disable=True)
    for module in [ours, *pipe.components.values()]:
        if isinstance(module, torch.nn.Module):
            _to(module, device, dtype)
    return ours.eval(), pipe, description


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)`` as diffusers' ``from_pretrained(torch_dtype=...)``
    casts: the submodules its class lists in ``_keep_in_fp32_modules`` stay float32.
    ``ModelMixin.to`` with a dtype is not called: it warns on every cast, even when the
    class keeps nothing in float32 (diffusers 0.42, modeling_utils.py)."""
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    torch.nn.Module.to(module, device, dtype)
    for name, sub in module.named_modules():
        if keep and any(part in keep for part in name.split(".")):
            torch.nn.Module.to(sub, torch.float32)


def _sd3_preset(preset: str, progress):
    import copy

    from diffusers import StableDiffusion3Pipeline

    from mmfast.models import StableDiffusion3Model
    from mmfast.models.sd3_presets import sd3_components
    from mmfast.nn import sd3_transformer_model

    torch.manual_seed(0)
    progress.phase("diffusers components")
    parts = sd3_components(preset, text_encoder_3=False)
    pipe = StableDiffusion3Pipeline(**parts, tokenizer=None, tokenizer_2=None, tokenizer_3=None)
    progress.phase("mmfast denoiser")
    transformer = sd3_transformer_model(parts["transformer"].config)
    transformer.load_state_dict(parts["transformer"].state_dict())
    progress.phase("mmfast VAE")
    ours = StableDiffusion3Model(transformer, copy.deepcopy(parts["vae"]), copy.deepcopy(parts["scheduler"]),
                                 parts["text_encoder"], parts["text_encoder_2"])
    return ours, pipe


def _sd3_pipeline(checkpoint: str, ours, dtype: torch.dtype):
    """diffusers' pipeline around its own transformer from the checkpoint and mmfast's
    (identical, shared) text encoders and tokenizers, and its own VAE from the checkpoint."""
    import copy

    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel.from_pretrained(checkpoint, subfolder="transformer", torch_dtype=dtype,
                                                        local_files_only=True)
    vae = AutoencoderKL.from_pretrained(checkpoint, subfolder="vae", torch_dtype=dtype, local_files_only=True)
    shared = {name: getattr(ours, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3",
                                                      "tokenizer", "tokenizer_2", "tokenizer_3")}
    return StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=copy.deepcopy(ours.scheduler),
                                    **shared)


def defaults(preset: str | None, checkpoint: str | None) -> dict:
    """(GPU, CPU) defaults that depend on the model: FLUX's steps and guidance."""
    if ldm_flux.owns(preset) or ldm_flux.checkpoint_index(checkpoint) is not None:
        return ldm_flux.defaults(preset, checkpoint)
    return {"guidance": (7.5, 7.5)}


def default_resolution(ours) -> int:
    from mmfast.models.flux import PackedFlowSampler

    if isinstance(ours, PackedFlowSampler):
        return ldm_flux.default_resolution(ours)
    return ours.denoiser.config.sample_size * ours.vae_scale_factor


def compiled(pipe, backend: str):
    """The same pipeline with its denoiser (UNet or transformer) under torch.compile, what
    diffusers' documentation recommends; the other components are shared."""
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    components = {**pipe.components, name: torch.compile(getattr(pipe, name), backend=backend)}
    twin = type(pipe)(**components)
    twin.set_progress_bar_config(disable=True)
    return twin


def sides(ours, pipe, batch: int, resolution: int, steps: int, guidance: float,
          cuda_graph: bool = False, compile_backend: str | None = None, preset: str | None = None) -> list[Side]:
    """mmfast and the diffusers pipeline, and with ``compile_backend`` the pipeline with its
    denoiser under torch.compile with that backend. ``preset``: what was built (FLUX's
    prompt length depends on it)."""
    from mmfast.models import StableDiffusion3Model
    from mmfast.models.flux import PackedFlowSampler

    if isinstance(ours, PackedFlowSampler):
        return ldm_flux.sides(ours, pipe, batch, resolution, steps, guidance, cuda_graph, compile_backend, preset)

    g = torch.Generator().manual_seed(0)
    if isinstance(ours, StableDiffusion3Model):  # CLIP-L/G tokens then T5's, with pooled embeddings
        config = ours.transformer.config
        tokens = ours.text_encoder.config.max_position_embeddings + T5_TOKENS
        shapes = {"prompt_embeds": (batch, tokens, config.joint_attention_dim),
                  "pooled_prompt_embeds": (batch, config.pooled_projection_dim)}
    else:
        text = ours.text_encoder.config
        shapes = {"prompt_embeds": (batch, text.max_position_embeddings, text.hidden_size)}
    shapes.update({f"negative_{name}": shape for name, shape in shapes.items()})
    prompt = {name: torch.randn(shape, generator=g).to(ours.device, ours.dtype) for name, shape in shapes.items()}
    common = dict(num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution, **prompt)
    twin = None if compile_backend is None else compiled(pipe, compile_backend)
    return pipeline_sides(ours, pipe, common, cuda_graph, twin)


def pipeline_sides(ours, pipe, common: dict, cuda_graph: bool, compiled_pipe=None,
                   output: str = "images") -> list[Side]:
    """mmfast's ``generate`` and the diffusers pipeline (and ``compiled_pipe``, when given)
    on the same arguments ``common`` and seed, each stamping ``decode_start`` as its VAE
    decoder starts; ``output``: the pipeline output's field ("images", Wan's "frames")."""
    def run_ours(output_type, decode_start=None):
        with on_first_call(ours.vae.decoder, decode_start, before=True):
            return ours.generate(output_type=output_type, progress=False, cuda_graph=cuda_graph,
                                 generator=torch.Generator(ours.device).manual_seed(1), **common)

    def runner(pipeline):
        @torch.no_grad()
        def run_pipe(output_type, decode_start=None):
            with on_first_call(pipeline.vae.decoder, decode_start, before=True):
                result = pipeline(output_type=output_type, generator=torch.Generator(ours.device).manual_seed(1),
                                  **common)
            return getattr(result, output)
        return run_pipe

    name = f"diffusers {type(pipe).__name__}"
    listed = [Side("mmfast", run_ours), Side(name, runner(pipe))]
    if compiled_pipe is not None:
        listed.append(Side(f"{name} + torch.compile", runner(compiled_pipe)))
    return listed


def reference_modules(pipe) -> list:
    """The pipeline's modules that run (for its weight bytes)."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae")
    return [module for module in (getattr(pipe, name, None) for name in names) if module is not None]


def reference_note(pipe) -> str:
    return (f"reference: diffusers {type(pipe).__name__} over the same components and weights; "
            "both sides take the same prompt embeddings (text encoding not timed)")


def sampler(side: Side, device: torch.device, clock=time.perf_counter) -> Callable[[], dict[str, float]]:
    """One timed sample of ``side``: {"denoise_s", "end_to_end_s"} of one call with the
    decoded image (denoising: until the VAE's decoder starts)."""

    def sample() -> dict[str, float]:
        times = timed(lambda mark: side.generate("pt", lambda: mark("decode_start")), device, clock)
        if "decode_start" not in times:
            raise RuntimeError(f"{side.name}: the call returned without running the VAE's decoder")
        return {"denoise_s": times["decode_start"], "end_to_end_s": times["total"]}
    return sample


def metrics(batch: int, steps: int, samples: dict[str, list[float]]) -> dict:
    """Figures (:func:`mmfast.profile.stats.figure`) from one side's samples."""
    latent, image = samples["denoise_s"], samples["end_to_end_s"]
    return {"end_to_end_s": figure(image), "denoise_s": figure(latent),
            "it_per_s": figure([steps / seconds for seconds in latent]),
            "s_per_image": figure([seconds / batch for seconds in image])}


def check_checkpoint(path: str | None) -> None:
    if path is not None and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"--checkpoint: {path} is not a diffusers pipeline directory (no model_index.json there)")
