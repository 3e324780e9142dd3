"""diffusers pipelines: every denoiser component (a UNet2DConditionModel,
SD3Transformer2DModel, DiTTransformer2DModel, FluxTransformer2DModel,
Flux2Transformer2DModel, WanTransformer3DModel or
QwenImageTransformer2DModel), the VAE (AutoencoderKL,
AutoencoderKLWan) and the CLIP text encoders (CLIPTextModel, CLIPTextModelWithProjection)
are patched by their own families, and the scheduler by
``mmfast.integrations.diffusers.schedulers.patch_scheduler`` (the fused scheduler update,
for the scheduler classes it covers; others are left as they are). A pipeline without a
denoiser (text components only) gets what it holds patched; one holding nothing mmfast
supports is refused (TypeError), not returned an empty handle.
"""

from __future__ import annotations

import importlib

from mmfast.integrations.patching import Family, PatchHandle

DENOISER_FAMILIES = (
    "mmfast.integrations.diffusers.unet2d_condition",
    "mmfast.integrations.diffusers.sd3_transformer",
    "mmfast.integrations.diffusers.dit_transformer",
    "mmfast.integrations.diffusers.flux_transformer",
    "mmfast.integrations.diffusers.flux2_transformer",
    "mmfast.integrations.diffusers.wan_transformer",
    "mmfast.integrations.diffusers.qwenimage_transformer",
)
# Components patched when present (a pipeline of text components only gets its text encoders).
OTHER_FAMILIES = ("mmfast.integrations.diffusers.autoencoder_kl", "mmfast.integrations.diffusers.autoencoder_kl_wan",
                  "mmfast.integrations.transformers.clip")


def _patch_scheduler(pipe, handle: PatchHandle) -> bool:
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        return False
    from mmfast.integrations.diffusers.schedulers import patch_scheduler

    return patch_scheduler(scheduler, handle)


def _prepare(pipe, handle: PatchHandle):
    families = [importlib.import_module(path).FAMILY for path in DENOISER_FAMILIES + OTHER_FAMILIES]
    found = False
    for name, component in pipe.components.items():
        family = next((f for f in families if f.recognises(component)), None)
        if family is not None:
            family.apply(component, handle)
            found = True
    found = _patch_scheduler(pipe, handle) or found
    if not found:
        supported = ", ".join(c for f in families for c in f.model_classes)
        raise TypeError(f"mmfast.patch: {type(pipe).__name__} holds no component mmfast supports "
                        f"({supported}, or a scheduler of mmfast.integrations.diffusers.schedulers.SUPPORTED)")
    return None  # everything is done: nothing left for the generic walk


FAMILY = Family("diffusers-pipeline", model_classes=("DiffusionPipeline",), prepare=_prepare)
