"""The Wan text-to-video workload of ``mmfast profile ldm``: mmfast's ``WanVideoModel``
(diffusers' Wan transformer and VAE patched by mmfast) against diffusers' ``WanPipeline``
over the same weights (its own unpatched transformer and VAE, loaded from the same state
dicts), the same prompt embeddings and seed.

Presets (random weights, :mod:`mmfast.models.wan_presets`, without the UMT5 text encoder:
the prompt embeddings [B, 226, 4096] are given, as the pipeline pads them): ``wan-tiny``
(32 x 32 px, 5 frames), ``wan2.1-1.3b`` and ``wan2.2-5b`` (480 x 832 px, 33 frames by
default). A ``--checkpoint`` WanPipeline directory is loaded without its text encoder.
Steps and guidance default to the pipeline's (50, 5.0); ``--resolution N`` asks for
N x N, ``--frames`` for another frame count (4k + 1).

Figures per call (one call decodes the video): end to end, denoising (until the VAE's
decoder starts), their difference, the VAE decode, and the denoising time per step.
"""

from __future__ import annotations

import copy
import json
import os

import torch

PRESETS = ("wan-tiny", "wan2.1-1.3b", "wan2.2-5b")
PREFIX = "wan"
TEXT_TOKENS = 226  # WanPipeline's max_sequence_length: prompt embeddings are padded to it


def is_wan_checkpoint(path: str | None) -> bool:
    index = os.path.join(path, "model_index.json") if path else None
    if index is None or not os.path.isfile(index):
        return False
    with open(index) as f:
        return json.load(f).get("_class_name") == "WanPipeline"


def fill_defaults(args, on_gpu: bool) -> None:
    """WanPipeline's steps and guidance; the preset's frame count (the checkpoint's: the
    GPU default of the real presets)."""
    from mmfast.models.wan_presets import PIPELINE_GUIDANCE, PIPELINE_STEPS, WAN_PRESETS

    video = WAN_PRESETS[args.preset]["video"] if args.preset else WAN_PRESETS["wan2.1-1.3b"]["video"]
    for name, value in (("steps", PIPELINE_STEPS if on_gpu or args.preset != "wan-tiny" else 2),
                        ("guidance", PIPELINE_GUIDANCE), ("frames", video[2])):
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def preset_modules(preset: str) -> dict:
    """A preset's transformer and VAE (diffusers modules, random weights), for counting
    parameters on the meta device; the text encoder is left out, as the profile builds it."""
    from mmfast.models.wan_presets import wan_components

    parts = wan_components(preset, text_encoder=False)
    return {name: parts[name] for name in ("transformer", "vae")}


def activation_estimate(preset: str, dtype: torch.dtype, batch: int, resolution=None,
                        frames: int | None = None) -> tuple[int, str]:
    """(bytes, what) of the activations that grow with the video rather than the weights,
    a rough upper-side sum of the largest live tensors (config numbers times sizes):

    - the denoiser on [uncond; cond] (2 x batch samples) of T video tokens: the hidden
      states, q, k, v, the attention output and a residual (6 x C each) and the FFN's
      intermediate, in ``dtype``; with per-token timesteps (Wan 2.2 TI2V) also the float32
      modulations [2B, T, 6, C], twice (the embedder's and the block's);
    - the VAE decoder at full resolution: three feature maps of its top width over the 4
      frames one latent frame decodes to, and the decoded video [B, 3, frames, H, W].
    """
    from mmfast.models.wan_presets import WAN_PRESETS

    preset_config = WAN_PRESETS[preset]
    height, width = preset_config["video"][:2] if resolution is None else (
        (resolution, resolution) if isinstance(resolution, int) else resolution)
    frames = preset_config["video"][2] if frames is None else frames
    t, vae = preset_config["transformer"], preset_config["vae"]
    spatial, temporal = vae.get("scale_factor_spatial", 8), vae.get("scale_factor_temporal", 4)
    patch = t["patch_size"]
    tokens = ((frames - 1) // temporal + 1) * (height // spatial // patch[1]) * (width // spatial // patch[2])
    channels = t["num_attention_heads"] * t["attention_head_dim"]
    size = dtype.itemsize
    denoiser = 2 * batch * tokens * (6 * channels + t["ffn_dim"]) * size
    if preset_config["pipeline"]["expand_timesteps"]:
        denoiser += 2 * (2 * batch * tokens * 6 * channels * 4)
    top = vae.get("decoder_base_dim") or vae.get("base_dim", 96)
    decoder = 3 * batch * top * min(temporal, frames) * height * width * size + batch * 3 * frames * height * width * size
    return denoiser + decoder, (f"the denoiser's activations over {tokens} video tokens and the VAE decoder's "
                                f"full-resolution maps ({height} x {width}, {frames} frames, batch {batch})")


def _twin(module: torch.nn.Module) -> torch.nn.Module:
    """An unpatched diffusers module of the same class and config with the same weights."""
    twin = type(module).from_config(module.config)
    twin.load_state_dict(module.state_dict())
    return twin


def build(preset: str | None, checkpoint: str | None, device: torch.device, dtype: torch.dtype,
          phases: dict[str, int] | None = None):
    """(mmfast WanVideoModel, diffusers WanPipeline, description)."""
    from diffusers import WanPipeline

    from mmfast.models import WanVideoModel
    from mmfast.profile import build_progress
    from mmfast.profile.ldm import _to
    from mmfast.profile.measure import building_on

    if checkpoint is not None:
        ours = WanVideoModel.from_pretrained(checkpoint, text_encoder=False)
        # diffusers' own modules from the same weights (its from_pretrained would need accelerate
        # for the transformer's float32 modules)
        transformer, vae = _twin(ours.transformer), _twin(ours.vae)
        transformer_2 = None if ours.transformer_2 is None else _twin(ours.transformer_2)
        flags = dict(boundary_ratio=ours.boundary_ratio, expand_timesteps=ours.expand_timesteps)
        description = f"checkpoint {checkpoint} (without its text encoder)"
    else:
        from mmfast.models.wan_presets import wan_components

        torch.manual_seed(0)
        with building_on(device, dtype), build_progress.building(phases, preset) as progress:
            progress.phase("diffusers components")
            parts = wan_components(preset, text_encoder=False)
            transformer, vae, transformer_2 = parts["transformer"], parts["vae"], None
            flags = dict(boundary_ratio=parts["boundary_ratio"], expand_timesteps=parts["expand_timesteps"])
            progress.phase("mmfast denoiser")
            mine = copy.deepcopy(transformer)
            progress.phase("mmfast VAE")
            ours = WanVideoModel(mine, copy.deepcopy(vae), copy.deepcopy(parts["scheduler"]), **flags)
        description = f"preset {preset} (random weights, without the UMT5 text encoder)"
    from mmfast.models.wan_presets import WAN_PRESETS

    ours.profile_size = WAN_PRESETS[preset or "wan2.1-1.3b"]["video"][:2]
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       transformer_2=transformer_2, scheduler=copy.deepcopy(ours.scheduler), **flags)
    pipe.set_progress_bar_config(disable=True)
    # Both sides cast alike: the classes' float32 modules (the Wan transformer's norms,
    # modulation tables and time embedder) stay float32, as diffusers' torch_dtype loading keeps them.
    for module in (ours.transformer, ours.transformer_2, ours.vae, pipe.transformer, pipe.transformer_2, pipe.vae):
        if module is not None:
            _to(module, device, dtype)
    return ours.eval(), pipe, description


def default_resolution(ours) -> tuple[int, int]:
    """(height, width) the build chose: the preset's, 480 x 832 for a checkpoint."""
    return ours.profile_size


def compiled(pipe, backend: str):
    """The same pipeline with its transformer under torch.compile (other components shared)."""
    components = {**pipe.components, "transformer": torch.compile(pipe.transformer, backend=backend)}
    twin = type(pipe)(**components, boundary_ratio=pipe.config.boundary_ratio,
                      expand_timesteps=pipe.config.expand_timesteps)
    twin.set_progress_bar_config(disable=True)
    return twin


def sides(ours, pipe, batch: int, resolution, steps: int, guidance: float, cuda_graph: bool = False,
          compile_backend: str | None = None, frames: int | None = None) -> list:
    """mmfast and the pipeline (and with ``compile_backend`` the pipeline with its
    transformer compiled), on the same prompt embeddings, size and seed. ``resolution``:
    (height, width) or one side for a square video."""
    from mmfast.profile.ldm import pipeline_sides

    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    ours._video_shape(batch, frames, height, width)  # bad sizes stop here, naming the argument
    g = torch.Generator().manual_seed(0)
    shape = (batch, TEXT_TOKENS, ours.transformer.config.text_dim)
    prompt = {name: torch.randn(shape, generator=g).to(ours.device, ours.dtype)
              for name in ("prompt_embeds", "negative_prompt_embeds")}
    common = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width, num_frames=frames,
                  **prompt)

    twin = None if compile_backend is None else compiled(pipe, compile_backend)
    return pipeline_sides(ours, pipe, common, cuda_graph, twin, output="frames")


def sampler(side, device: torch.device):
    from mmfast.profile.ldm import sampler as ldm_sampler

    return ldm_sampler(side, device)


def metrics(batch: int, steps: int, samples: dict[str, list[float]]) -> dict:
    """The latent-diffusion figures, and the VAE decode (end to end minus denoising) and
    the denoising time per step on their own."""
    from mmfast.profile.ldm import metrics as ldm_metrics
    from mmfast.profile.stats import figure

    out = ldm_metrics(batch, steps, samples)
    denoise, total = samples["denoise_s"], samples["end_to_end_s"]
    out["step_s"] = figure([seconds / steps for seconds in denoise])
    out["decode_s"] = figure([t - d for t, d in zip(total, denoise)])
    return out


def reference_modules(pipe) -> list:
    return [m for m in (pipe.transformer, pipe.transformer_2, pipe.vae) if m is not None]


def reference_note(pipe) -> str:
    return (f"reference: diffusers {type(pipe).__name__} over the same weights (its own unpatched transformer and "
            "VAE); both sides take the same prompt embeddings (UMT5 text encoding not timed)")


def check_checkpoint(path: str | None) -> None:
    from mmfast.profile.ldm import check_checkpoint as ldm_check

    ldm_check(path)
