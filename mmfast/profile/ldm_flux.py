"""The FLUX part of ``mmfast profile ldm``: mmfast's ``FluxModel`` / ``Flux2Model`` against
diffusers' ``FluxPipeline`` / ``Flux2KleinPipeline`` (``Flux2Pipeline`` for a FLUX.2-dev
checkpoint) over the same weights: the pipeline runs diffusers' own transformer and VAE,
mmfast's side a copy of the transformer patched by mmfast's FLUX family and a copy of the
VAE with mmfast blocks, and the fused flow-match stepper.

Presets (random weights, :mod:`mmfast.models.flux_presets`): ``flux-tiny`` and
``flux2-tiny`` (a CPU runs them in well under a second), ``flux.1-dev`` and ``flux.2-klein``
(the step-distilled 4B). No text encoders on either side: both take the same random
prompt embeddings of the pipelines' 512 tokens (T5 for FLUX.1, with CLIP's pooled vector;
Qwen3's stacked hidden states for klein), so text encoding is not timed.

Guidance as the models are used: FLUX.1-dev's embedded guidance (``--guidance``, default
3.5, one transformer pass per step; FluxPipeline's true CFG is not exercised); klein is
step-distilled (no guidance; default 4 steps); a FLUX.2 checkpoint that is not distilled
gets classifier-free guidance when ``--guidance`` > 1, on both sides.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mmfast.profile import build_progress
from mmfast.profile.measure import building_on

PRESETS = ("flux-tiny", "flux2-tiny", "flux.1-dev", "flux.2-klein")
PIPELINES = {"FluxPipeline": 1, "Flux2KleinPipeline": 2, "Flux2Pipeline": 2}
TEXT_TOKENS = 512  # the pipelines' max_sequence_length: the prompt embeddings of a checkpoint


def owns(preset: str | None) -> bool:
    return preset is not None and preset.startswith("flux")


def family(preset: str) -> str:
    """'flux1' or 'flux2': the generation a preset builds."""
    from mmfast.models.flux_presets import flux_preset

    return f"flux{flux_preset(preset)['generation']}"


def checkpoint_index(checkpoint: str | None) -> dict | None:
    """model_index.json of a FLUX pipeline directory, else None."""
    if checkpoint is None:
        return None
    from mmfast.models._pipeline_dir import pipeline_class, read_json

    path = Path(checkpoint) / "model_index.json"
    if not path.is_file():
        return None
    index = read_json(path, "model_index.json")
    return index if pipeline_class(index) in PIPELINES else None


def defaults(preset: str | None, checkpoint: str | None) -> dict:
    """(GPU default, CPU default) of --steps and --guidance for a FLUX preset or checkpoint."""
    if owns(preset):
        from mmfast.models.flux_presets import flux_preset

        spec = flux_preset(preset)
        generation, distilled = spec["generation"], spec.get("is_distilled", False)
    else:
        index = checkpoint_index(checkpoint)
        generation, distilled = PIPELINES[index["_class_name"]], index.get("is_distilled") is True
    if generation == 1:
        return {"steps": (28, 2), "guidance": (3.5, 3.5)}
    return {"steps": (4, 2), "guidance": (1.0, 1.0)} if distilled else {"steps": (50, 2), "guidance": (4.0, 4.0)}


def preset_modules(preset: str) -> dict:
    """The diffusers modules of a preset (transformer, VAE), without its scheduler."""
    from mmfast.models.flux_presets import flux_components

    return {name: part for name, part in flux_components(preset).items() if isinstance(part, torch.nn.Module)}


def build(preset: str | None, checkpoint: str | None, device: torch.device, dtype: torch.dtype,
          phases: dict[str, int] | None = None):
    """(mmfast FluxModel or Flux2Model, the diffusers pipeline, description)."""
    from mmfast.models import Flux2Model, FluxModel
    from mmfast.profile.ldm import _to

    if checkpoint is not None:
        index = checkpoint_index(checkpoint)
        model = Flux2Model if PIPELINES[index["_class_name"]] == 2 else FluxModel
        ours = model.from_pretrained(checkpoint, torch_dtype=dtype, device=device)
        pipe = _pipeline(index["_class_name"], _reference_parts(checkpoint, ours, dtype), index.get("is_distilled"))
        description = f"checkpoint {checkpoint}"
    else:
        from mmfast.models.flux_presets import flux_components, flux_preset

        spec = flux_preset(preset)
        torch.manual_seed(0)
        with building_on(device, dtype), build_progress.building(phases, preset) as progress:
            progress.phase("diffusers components")
            parts = flux_components(preset)
            flux2 = spec["generation"] == 2
            pipe = _pipeline("Flux2KleinPipeline" if flux2 else "FluxPipeline", parts, spec.get("is_distilled"))
            progress.phase("mmfast denoiser")
            transformer = type(parts["transformer"]).from_config(parts["transformer"].config)
            transformer.load_state_dict(parts["transformer"].state_dict())
            progress.phase("mmfast VAE")
            # The model swaps its VAE's blocks in place: it gets a copy, the pipeline keeps diffusers' own.
            rest = dict(vae=copy.deepcopy(parts["vae"]), scheduler=copy.deepcopy(parts["scheduler"]))
            ours = (Flux2Model(transformer, **rest, is_distilled=spec.get("is_distilled", False)) if flux2
                    else FluxModel(transformer, **rest))
        description = f"preset {preset} (random weights, without text encoders)"
    pipe.set_progress_bar_config(disable=True)
    for module in [ours, *pipe.components.values()]:
        if isinstance(module, torch.nn.Module):
            _to(module, device, dtype)
    return ours.eval(), pipe, description


def _pipeline(name: str, parts: dict, is_distilled=None):
    import diffusers

    if name == "FluxPipeline":
        return diffusers.FluxPipeline(**parts, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                      tokenizer_2=None)
    if name == "Flux2KleinPipeline":
        return diffusers.Flux2KleinPipeline(**parts, text_encoder=None, tokenizer=None,
                                            is_distilled=bool(is_distilled))
    return diffusers.Flux2Pipeline(**parts, text_encoder=None, tokenizer=None)


def _reference_parts(checkpoint: str, ours, dtype: torch.dtype) -> dict:
    """diffusers' own transformer and VAE from the checkpoint, the scheduler a copy of ours."""
    import diffusers

    load = dict(torch_dtype=dtype, local_files_only=True)
    transformer = getattr(diffusers, type(ours.transformer).__name__).from_pretrained(
        checkpoint, subfolder="transformer", **load)
    vae = getattr(diffusers, type(ours.vae).__name__).from_pretrained(checkpoint, subfolder="vae", **load)
    return {"transformer": transformer, "vae": vae, "scheduler": copy.deepcopy(ours.scheduler)}


def default_resolution(ours) -> int:
    """1024 px for the released VAEs (their sample_size), a few latent cells for tiny ones."""
    return ours.vae.config.sample_size


def _prompt(ours, preset: str | None, batch: int, guided: bool) -> dict:
    from mmfast.models import FluxModel

    tokens = TEXT_TOKENS
    if owns(preset):
        from mmfast.models.flux_presets import flux_preset

        tokens = flux_preset(preset)["text_tokens"]
    config = ours.transformer.config
    shapes = {"prompt_embeds": (batch, tokens, config.joint_attention_dim)}
    if isinstance(ours, FluxModel):
        shapes["pooled_prompt_embeds"] = (batch, config.pooled_projection_dim)
    if guided:
        shapes.update({f"negative_{name}": shape for name, shape in shapes.items()})
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g).to(ours.device, ours.dtype) for name, shape in shapes.items()}


def sides(ours, pipe, batch: int, resolution: int, steps: int, guidance: float, cuda_graph: bool = False,
          compile_backend: str | None = None, preset: str | None = None) -> list:
    """mmfast and the diffusers pipeline, and with ``compile_backend`` the pipeline with its
    transformer under torch.compile with that backend."""
    from mmfast.models import Flux2Model
    from mmfast.profile.ldm import pipeline_sides

    guided = (isinstance(ours, Flux2Model) and ours._classifier_free and not ours.is_distilled and guidance > 1)
    prompt = _prompt(ours, preset, batch, guided)
    common = dict(num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution, **prompt)
    twin = None if compile_backend is None else _compiled(pipe, compile_backend)
    return pipeline_sides(ours, pipe, common, cuda_graph, twin)


def _compiled(pipe, backend: str):
    """The same pipeline (and klein's is_distilled flag) with its transformer compiled."""
    components = {**pipe.components, "transformer": torch.compile(pipe.transformer, backend=backend)}
    extra = {"is_distilled": pipe.config.is_distilled} if "is_distilled" in pipe.config else {}
    twin = type(pipe)(**components, **extra)
    twin.set_progress_bar_config(disable=True)
    return twin
