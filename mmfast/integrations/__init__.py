"""Per-instance, reversible replacement of hot modules in Hugging Face transformers and
diffusers models: one small file per model family with a table of replacements.

    handle = mmfast.patch(model)   # the instance now runs mmfast kernels
    handle.undo()                  # and now it runs exactly as before

Adding a family: a file under ``transformers/`` or ``diffusers/`` that defines ``FAMILY``
(a :class:`mmfast.integrations.patching.Family`), and a line in ``FAMILY_MODULES`` below.
Family modules are imported on demand, so neither transformers nor diffusers is imported
by ``import mmfast``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

from mmfast.integrations.patching import Family, PatchHandle, Replacement

# family name -> module defining FAMILY; the order is the order families are tried in.
FAMILY_MODULES: dict[str, str] = {
    "idefics2": "mmfast.integrations.transformers.idefics2",
    "diffusers-scheduler": "mmfast.integrations.diffusers.schedulers",
    "mllama": "mmfast.integrations.transformers.mllama",
    "blip2": "mmfast.integrations.transformers.blip2",
    "llava": "mmfast.integrations.transformers.llava",
    "clip": "mmfast.integrations.transformers.clip",
    "siglip": "mmfast.integrations.transformers.siglip",
    "siglip2": "mmfast.integrations.transformers.siglip2",
    "qwen2_vl": "mmfast.integrations.transformers.qwen2_vl",
    "qwen2_5_vl": "mmfast.integrations.transformers.qwen2_5_vl",
    "qwen3_vl": "mmfast.integrations.transformers.qwen3_vl",
}
FAMILY_MODULES["diffusers-unet2d-condition"] = "mmfast.integrations.diffusers.unet2d_condition"
FAMILY_MODULES["diffusers-sd3-transformer"] = "mmfast.integrations.diffusers.sd3_transformer"
FAMILY_MODULES["diffusers-dit-transformer"] = "mmfast.integrations.diffusers.dit_transformer"
FAMILY_MODULES["diffusers-flux-transformer"] = "mmfast.integrations.diffusers.flux_transformer"
FAMILY_MODULES["diffusers-flux2-transformer"] = "mmfast.integrations.diffusers.flux2_transformer"
FAMILY_MODULES["diffusers-qwenimage-transformer"] = "mmfast.integrations.diffusers.qwenimage_transformer"
FAMILY_MODULES["diffusers-pipeline"] = "mmfast.integrations.diffusers.pipelines"
FAMILY_MODULES["diffusers-autoencoder-kl"] = "mmfast.integrations.diffusers.autoencoder_kl"
FAMILY_MODULES["sam"] = "mmfast.integrations.transformers.sam"
FAMILY_MODULES["diffusers-wan-transformer"] = "mmfast.integrations.diffusers.wan_transformer"
FAMILY_MODULES["diffusers-pipeline"] = "mmfast.integrations.diffusers.pipelines"
FAMILY_MODULES["diffusers-autoencoder-kl"] = "mmfast.integrations.diffusers.autoencoder_kl"
FAMILY_MODULES["diffusers-autoencoder-kl-wan"] = "mmfast.integrations.diffusers.autoencoder_kl_wan"
FAMILY_MODULES["causal_lm"] = "mmfast.integrations.transformers.causal_lm"


def families() -> list[Family]:
    return [importlib.import_module(path).FAMILY for path in FAMILY_MODULES.values()]


def find_family(target: Any) -> Family:
    for family in families():
        if family.recognises(target):
            return family
    for family in families():  # a part of a model: the first family whose table holds something in it
        if family.holds(target):
            return family
    supported = "; ".join(f"{f.name}: {', '.join(f.model_classes)}" for f in families())
    raise TypeError(
        f"mmfast.patch: no family recognises model of type {type(target).__name__}. "
        f"Supported: {supported or 'none registered'} (or a module holding one of their replaced modules)"
    )


# ``patch``'s default for sequence_parallel: told apart from an explicit None, which is what
# ``dist.group.WORLD`` is before init_process_group.
_NOT_GIVEN: Any = type("_NotGiven", (), {"__repr__": lambda self: "None"})()


def _check_explicit_none() -> None:
    """``sequence_parallel=None`` passed explicitly in a multi-process launch (torchrun sets
    WORLD_SIZE) before torch.distributed is initialised is, in all likelihood,
    ``dist.group.WORLD`` read too early (it is None until ``init_process_group``): refused,
    rather than silently running without sequence parallelism."""
    import torch.distributed as dist

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return
    if world > 1 and dist.is_available() and not dist.is_initialized():
        raise ValueError(
            f"sequence_parallel: got None in a launch of WORLD_SIZE={world} processes before torch.distributed "
            "is initialised (dist.group.WORLD is None until init_process_group): call "
            "torch.distributed.init_process_group first, or leave sequence_parallel out to run without it")


def patch(target: Any, *, sequence_parallel: Any = _NOT_GIVEN) -> PatchHandle:
    """Replace the hot modules of ``target`` (a model or pipeline instance) with mmfast's,
    in place; returns a :class:`PatchHandle` whose ``undo()`` restores it exactly.
    Other instances of the same classes are untouched.

    ``sequence_parallel``: a torch.distributed process group (``dist.group.WORLD`` for
    all ranks, after ``init_process_group``: it is None before that, and an explicit None
    in a multi-process launch (``WORLD_SIZE`` > 1) with torch.distributed not initialised
    raises ValueError; left out, or None otherwise, the model runs as usual). Every rank
    of the group calls the patched model with the same full inputs and gets the
    single-process output, the tokens split over the ranks inside (Ulysses
    attention, see mmfast.integrations.diffusers.sequence_parallel). Taken by diffusers'
    SD3Transformer2DModel, DiTTransformer2DModel, FluxTransformer2DModel,
    Flux2Transformer2DModel, QwenImageTransformer2DModel and WanTransformer3DModel, and
    pipelines holding one; a ValueError for any other target, or a world size that does
    not divide the head count.

    A part of a model (a resampler, a Q-Former, a module holding one) gets what the first
    family whose table names a module in it replaces. A target no family knows, holding
    nothing any table names, raises TypeError; a known model holding nothing to replace
    (e.g. an Mllama text model without cross-attention layers) warns and is left as is."""
    existing = getattr(target, "_mmfast_patch_handle", None)
    if existing is not None and existing.active:
        raise ValueError(
            f"mmfast.patch: this {type(target).__name__} is already patched; "
            "call handle.undo() before patching it again"
        )
    if sequence_parallel is _NOT_GIVEN:
        sequence_parallel = None
    elif sequence_parallel is None:
        _check_explicit_none()
    group = None
    if sequence_parallel is not None:
        from mmfast.distributed.collectives import resolve_group

        group = resolve_group(sequence_parallel, "sequence_parallel")
    family = find_family(target)
    handle = PatchHandle(target, family.name)
    handle.sequence_parallel = group
    try:
        family.apply(target, handle, whole_model=family.recognises(target))
        if sequence_parallel is not None and not handle.sequence_parallel_models:
            supported = ", ".join(c for f in families() if f.sequence_parallel is not None for c in f.model_classes)
            raise ValueError(f"sequence_parallel: {type(target).__name__} holds no model mmfast runs "
                             f"sequence-parallel (supported: {supported}, or a pipeline holding one)")
    except BaseException:
        handle.undo()
        raise
    finally:
        handle.sequence_parallel = None
    if not handle.replaced:
        warnings.warn(f"mmfast.patch: this {type(target).__name__} holds nothing the {family.name} family "
                      "replaces; it runs as before", stacklevel=2)
    handle.set_attr(target, "_mmfast_patch_handle", handle)
    return handle


__all__ = ["FAMILY_MODULES", "Family", "PatchHandle", "Replacement", "families", "find_family", "patch"]
