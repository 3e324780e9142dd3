"""diffusers pipelines: every denoiser component (a UNet2DConditionModel,
SD3Transformer2DModel or DiTTransformer2DModel) is patched by its own family, and the
scheduler by ``mmfast.integrations.diffusers.schedulers.patch_scheduler`` when that module
is present (fused guidance + scheduler step); without it the scheduler is left as it is.
"""

from __future__ import annotations

import importlib

from mmfast.integrations.patching import Family, PatchHandle

DENOISER_FAMILIES = (
    "mmfast.integrations.diffusers.unet2d_condition",
    "mmfast.integrations.diffusers.sd3_transformer",
    "mmfast.integrations.diffusers.dit_transformer",
)


def _patch_scheduler(pipe, handle: PatchHandle) -> None:
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        return
    try:
        schedulers = importlib.import_module("mmfast.integrations.diffusers.schedulers")
    except ModuleNotFoundError:
        return
    schedulers.patch_scheduler(scheduler, handle)


def _prepare(pipe, handle: PatchHandle):
    families = [importlib.import_module(path).FAMILY for path in DENOISER_FAMILIES]
    found = False
    for name, component in pipe.components.items():
        family = next((f for f in families if f.recognises(component)), None)
        if family is not None:
            family.apply(component, handle)
            found = True
    if not found:
        raise TypeError(f"mmfast.patch: {type(pipe).__name__} holds no denoiser mmfast supports "
                        "(UNet2DConditionModel, SD3Transformer2DModel, DiTTransformer2DModel)")
    _patch_scheduler(pipe, handle)
    return None  # everything is done: nothing left for the generic walk


FAMILY = Family("diffusers-pipeline", model_classes=("DiffusionPipeline",), prepare=_prepare)
