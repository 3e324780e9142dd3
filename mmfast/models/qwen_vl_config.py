"""Reading and writing the ``config.json`` of the Qwen vision-language models (Qwen2.5-VL,
Qwen3-VL): the parts their config classes share.

Both read text fields from ``text_config`` or the top level (top level wins), rope
settings from transformers 5's ``rope_parameters`` or 4.x's ``rope_theta`` +
``rope_scaling``, vision fields from ``vision_config``; both write a transformers-5 style
dict over the one they were read from. What differs (the fields, the model types, extra
checks) stays in each model's file.
"""

from __future__ import annotations

from typing import NamedTuple

# Keys of the dict a config was read from that describe the run, not the model.
_NOT_WRITTEN = ("preset", "dtype", "torch_dtype")


class TextSettings(NamedTuple):
    fields: dict            # text_config's fields overlaid with the top level's
    rope_theta: float
    mrope_section: tuple


def read_text_settings(config: dict, *, model_name: str, default_rope_theta: float, default_mrope_section: tuple,
                       unsupported_flags: tuple = ()) -> TextSettings:
    """The text fields and M-RoPE settings of ``config``; ``ValueError`` for a rope type
    other than default M-RoPE, a set flag of ``unsupported_flags``, or an activation other
    than SiLU."""
    text = dict(config.get("text_config") or {})
    fields = {**text, **{k: v for k, v in config.items() if k not in ("text_config", "vision_config")}}
    rope = dict(text.get("rope_parameters") or config.get("rope_parameters") or {})
    rope.update({k: v for k, v in (fields.get("rope_scaling") or {}).items() if k not in rope})
    theta = rope.get("rope_theta", fields.get("rope_theta", default_rope_theta))
    if rope.get("rope_type", "default") not in ("default", "mrope"):
        raise ValueError(f"config.json: rope type {rope['rope_type']!r} is not supported (default M-RoPE only)")
    for flag in unsupported_flags:
        if fields.get(flag):
            raise ValueError(f"config.json: {flag} is not supported by mmfast's {model_name}")
    if fields.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {fields['hidden_act']!r} (only 'silu' is supported)")
    return TextSettings(fields, float(theta), tuple(rope.get("mrope_section", default_mrope_section)))


def read_vision_settings(config: dict, keys: tuple) -> dict:
    """The vision tower's keyword arguments: ``vision_config``'s ``keys`` that it has, and
    ``rope_theta`` from its ``rope_parameters``."""
    vision_config = dict(config.get("vision_config") or {})
    vision = {k: vision_config[k] for k in keys if k in vision_config}
    vision_rope = vision_config.get("rope_parameters") or {}
    if "rope_theta" in vision_rope:
        vision["rope_theta"] = float(vision_rope["rope_theta"])
    return vision


def write_vision_config(vision: dict, hidden_size: int, **fields) -> dict:
    """``vision_config`` from the tower's keyword arguments (tuples as lists, ``rope_theta``
    as ``rope_parameters``; ``out_hidden_size`` defaults to the text hidden size) and
    ``fields``."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in vision.items() if k != "rope_theta"}
    out.update(out_hidden_size=vision.get("out_hidden_size", hidden_size), **fields)
    if "rope_theta" in vision:
        out["rope_parameters"] = {"rope_type": "axial", "rope_theta": vision["rope_theta"]}
    return out


def write_config(raw: dict, *, architecture: str, model_type: str, text: dict, vision: dict, top: dict,
                 stale_text_keys: tuple = ()) -> dict:
    """The config.json dict: ``raw`` (the dict read, without its run settings and the text
    fields written again at the top) overlaid with ``text`` under ``text_config`` (minus
    ``raw``'s ``stale_text_keys``, which ``text`` replaces in another form), ``vision``
    under ``vision_config`` and the ``top`` level fields."""
    kept = {k: v for k, v in raw.items() if k not in text and k not in _NOT_WRITTEN}
    raw_text = {k: v for k, v in (kept.get("text_config") or {}).items() if k not in stale_text_keys}
    return {**kept, "architectures": [architecture], "model_type": model_type,
            "text_config": {**raw_text, **text},
            "vision_config": {**(kept.get("vision_config") or {}), **vision}, **top}
