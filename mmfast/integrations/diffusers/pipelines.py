"""diffusers pipelines: every denoiser component (a UNet2DConditionModel,
SD3Transformer2DModel or DiTTransformer2DModel), the VAE (AutoencoderKL) and the CLIP text
encoders (CLIPTextModel, CLIPTextModelWithProjection) are patched by their own families,
and the scheduler by
``mmfast.integrations.diffusers.schedulers.patch_scheduler`` (the fused scheduler update,
for the scheduler classes it covers; others are left as they are).
"""

from __future__ import annotations

import importlib

from mmfast.integrations.patching import Family, PatchHandle

DENOISER_FAMILIES = (
    "mmfast.integrations.diffusers.unet2d_condition",
    "mmfast.integrations.diffusers.sd3_transformer",
    "mmfast.integrations.diffusers.dit_transformer",
)
# Components patched when present; a pipeline still needs a denoiser.
OTHER_FAMILIES = ("mmfast.integrations.diffusers.autoencoder_kl", "mmfast.integrations.transformers.clip")


def _patch_scheduler(pipe, handle: PatchHandle) -> None:
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        return
    from mmfast.integrations.diffusers.schedulers import patch_scheduler

    patch_scheduler(scheduler, handle)


def _prepare(pipe, handle: PatchHandle):
    denoisers = [importlib.import_module(path).FAMILY for path in DENOISER_FAMILIES]
    others = [importlib.import_module(path).FAMILY for path in OTHER_FAMILIES]
    found = False
    for name, component in pipe.components.items():
        family = next((f for f in denoisers + others if f.recognises(component)), None)
        if family is not None:
            family.apply(component, handle)
            found = found or family in denoisers
    if not found:
        raise TypeError(f"mmfast.patch: {type(pipe).__name__} holds no denoiser mmfast supports "
                        "(UNet2DConditionModel, SD3Transformer2DModel, DiTTransformer2DModel)")
    _patch_scheduler(pipe, handle)
    return None  # everything is done: nothing left for the generic walk


FAMILY = Family("diffusers-pipeline", model_classes=("DiffusionPipeline",), prepare=_prepare)
