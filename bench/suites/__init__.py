"""The benchmark suites, by name. A suite module defines ``SUITE`` (a
``mmfast.bench.suite.Suite``); adding one is a file here and a line below.
Modules are imported on demand, so one suite's missing dependency never breaks another.
"""

from __future__ import annotations

import importlib

from mmfast.bench.suite import Suite

_MODULES = {
    "norm": "mmfast.bench.suites.norm",
    "attention": "mmfast.bench.suites.attention",
    "qwen_window_attention": "mmfast.bench.suites.qwen_window_attention",
    "joint_attention_rotary": "mmfast.bench.suites.joint_attention_rotary",
    "cross_attention": "mmfast.bench.suites.cross_attention",
    "activation": "mmfast.bench.suites.activation",
    "patch_embed": "mmfast.bench.suites.patch_embed",
    "vision_tower": "mmfast.bench.suites.vision_tower",
    "group_norm": "mmfast.bench.suites.group_norm",
    "diffusion_unet": "mmfast.bench.suites.diffusion_unet",
    "scheduler_step": "mmfast.bench.suites.scheduler_step",
    "contrastive": "mmfast.bench.suites.contrastive",
    "qwen_vision_tower": "mmfast.bench.suites.qwen_vision_tower",
    "qwen3_vision_tower": "mmfast.bench.suites.qwen3_vision_tower",
    "linear_cross_entropy": "mmfast.bench.suites.linear_cross_entropy",
    "vae": "mmfast.bench.suites.vae",
    "wan_vae_norm": "mmfast.bench.suites.wan_vae_norm",
    "hf_decoder_attention": "mmfast.bench.suites.hf_decoder_attention",
    "sam_encoder_attention": "mmfast.bench.suites.sam_encoder_attention",
    "flux_transformer_step": "mmfast.bench.suites.flux_transformer_step",
    "wan_transformer_step": "mmfast.bench.suites.wan_transformer_step",
    "wan_vae_decode": "mmfast.bench.suites.wan_vae_decode",
}


def names() -> list[str]:
    return list(_MODULES)


def get(name: str) -> Suite:
    if name not in _MODULES:
        raise KeyError(f"unknown suite '{name}' (known: {', '.join(_MODULES)})")
    return importlib.import_module(_MODULES[name]).SUITE
