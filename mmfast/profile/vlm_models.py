"""The vision-language models ``mmfast profile vlm --model`` runs: for each, how mmfast's
model and transformers' class with the same config and weights are built, and a batch of
one-image prompts for both.

The transformers model is built from mmfast's config and takes mmfast's state dict (the
in-memory names are equal), so a checkpoint is read once. Both are built in the target
dtype on the target device: a float32 7B pair would not fit beside each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mmfast.profile import build_progress
from mmfast.profile.measure import building_on


@dataclass
class Batch:
    """One batch of prompts: what each side's ``generate`` takes besides the token counts."""
    input_ids: torch.Tensor
    ours: dict       # mmfast's generate keyword arguments
    reference: dict  # transformers' generate keyword arguments
    pixels: int      # image side in pixels


@dataclass(frozen=True)
class VisionLanguageModel:
    name: str                   # the --model value
    architecture: str           # config.json's "architectures" entry, and the transformers class
    presets: tuple[str, ...]    # the first is the GPU default
    build_ours: Callable        # (preset or None, checkpoint or None, dtype, device) -> mmfast model
    reference_config: Callable  # mmfast model -> transformers config
    batch: Callable             # (mmfast model, batch, resolution or None, text tokens, device, dtype) -> Batch
    fixed_resolution: bool = True  # the tower takes its config's image size only


def build(spec: VisionLanguageModel, preset: str | None, checkpoint: str | None, device: torch.device,
          dtype: torch.dtype, phases: dict[str, int] | None = None):
    """(mmfast model, transformers model, description) with equal weights. ``phases``:
    the estimate's parameters per build phase; a large model shows a progress bar."""
    import transformers

    torch.manual_seed(0)
    with building_on(device, dtype), build_progress.building(phases, spec.name) as progress:
        progress.phase("mmfast model")
        ours = spec.build_ours(preset, checkpoint, dtype, device)
        config = spec.reference_config(ours)
        config._attn_implementation = "sdpa"
        progress.phase("transformers model")
        reference = getattr(transformers, spec.architecture)(config).to(dtype)
        progress.phase("copying weights")
        reference.load_state_dict(ours.state_dict())
    if spec.name == "blip2":  # the Q-Former in float32 on both sides, as Hugging Face's from_pretrained keeps it
        for model in (ours, reference):
            model.qformer.float()
            model.query_tokens.data = model.query_tokens.data.float()
    source = f"checkpoint {checkpoint}" if checkpoint is not None else f"preset {preset} (random weights)"
    return ours.eval(), reference.eval(), f"{spec.name}, {source}"


def _loader(cls_name: str):
    def build_ours(preset, checkpoint, dtype, device):
        import mmfast.models

        cls = getattr(mmfast.models, cls_name)
        if checkpoint is not None:
            return cls.from_pretrained(checkpoint, dtype=dtype, device=device)
        return cls.from_preset(preset).to(dtype)
    return build_ours


def _text(batch: int, n: int, top: int, g: torch.Generator) -> torch.Tensor:
    """Random text token ids in [3, top): no special token (eos is small) and no placeholder."""
    return torch.randint(3, top, (batch, n), generator=g)


# ---- Qwen2.5-VL ---------------------------------------------------------------------------


def _qwen_config(ours):
    import transformers

    return transformers.Qwen2_5_VLConfig(**ours.config.to_dict())


def _qwen_batch(ours, batch: int, resolution: int, text_tokens: int, device, dtype) -> Batch:
    """Each prompt: text, one square image of about ``resolution`` pixels, text (``text_tokens``
    in all, half before the image)."""
    config = ours.config
    vision = ours.model.visual
    patch, merge = vision.patch_size, vision.spatial_merge_size
    side = max(1, round(resolution / (patch * merge))) * merge  # patches per side, a multiple of merge
    image_tokens = side * side // merge**2
    eos = [config.eos_token_id] if isinstance(config.eos_token_id, int) else config.eos_token_id or []
    top = min(config.image_token_id, config.video_token_id, config.vision_start_token_id, *eos)
    g = torch.Generator().manual_seed(0)
    before = text_tokens // 2
    end = getattr(config, "vision_end_token_id", None)  # Qwen3-VL's config has it: the processor's layout
    ids = torch.cat([_text(batch, before, top, g), torch.full((batch, 1), config.vision_start_token_id),
                     torch.full((batch, image_tokens), config.image_token_id),
                     *([torch.full((batch, 1), end)] if end is not None else []),
                     _text(batch, text_tokens - before, top, g)], dim=1).to(device)
    patch_dim = config.vision.get("in_channels", 3) * config.vision.get("temporal_patch_size", 2) * patch * patch
    pixels = torch.randn(batch * side * side, patch_dim, generator=g).to(device, dtype)
    grid = torch.tensor([[1, side, side]] * batch, device=device)
    return Batch(ids, {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid},
                 {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
                  "image_grid_thw": grid, "mm_token_type_ids": (ids == config.image_token_id).int()},
                 side * patch)


# ---- Qwen3-VL -----------------------------------------------------------------------------

QWEN3_VL_RESOLUTION = (1344, 64)  # (GPU, CPU) default image side: issue 8's time-to-first-token case on a GPU


def _qwen3_config(ours):
    import transformers

    return transformers.Qwen3VLConfig(**ours.config.to_dict())


def _qwen3_batch(ours, batch: int, resolution: int | None, text_tokens: int, device, dtype) -> Batch:
    """As Qwen2.5-VL's (one square image per prompt, between two halves of the text)."""
    if resolution is None:
        resolution = QWEN3_VL_RESOLUTION[0 if device.type == "cuda" else 1]
    return _qwen_batch(ours, batch, resolution, text_tokens, device, dtype)


# ---- LLaVA --------------------------------------------------------------------------------


def _llava_config(ours):
    import transformers

    return transformers.LlavaConfig(**ours.config.to_dict())


def _llava_batch(ours, batch: int, resolution: int, text_tokens: int, device, dtype) -> Batch:
    """Each prompt: text, one image (its placeholders), text (``text_tokens`` in all)."""
    config = ours.config
    vision = config.vision
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    tokens = patches + (vision["style"] == "clip") - (config.vision_feature_select_strategy == "default")
    g = torch.Generator().manual_seed(0)
    top = min(config.image_token_index, config.text["vocab_size"])
    before = text_tokens // 2
    ids = torch.cat([_text(batch, before, top, g), torch.full((batch, tokens), config.image_token_index),
                     _text(batch, text_tokens - before, top, g)], dim=1).to(device)
    side = vision["image_size"]
    pixels = torch.randn(batch, vision["num_channels"], side, side, generator=g).to(device, dtype)
    return Batch(ids, {"input_ids": ids, "pixel_values": pixels},
                 {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}, side)


# ---- BLIP-2 -------------------------------------------------------------------------------


def _blip2_config(ours):
    import transformers

    return transformers.Blip2Config(**ours.config.to_dict())


def _blip2_batch(ours, batch: int, resolution: int, text_tokens: int, device, dtype) -> Batch:
    """Each prompt: the image's ``num_query_tokens`` placeholders, then ``text_tokens`` of text
    (the processor's order)."""
    config = ours.config
    g = torch.Generator().manual_seed(0)
    top = min(config.image_token_index, config.text_config["vocab_size"])
    ids = torch.cat([torch.full((batch, config.num_query_tokens), config.image_token_index),
                     _text(batch, text_tokens, top, g)], dim=1).to(device)
    side = config.vision_config["image_size"]
    pixels = torch.randn(batch, 3, side, side, generator=g).to(device, dtype)
    return Batch(ids, {"input_ids": ids, "pixel_values": pixels},
                 {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}, side)


MODELS = {spec.name: spec for spec in (
    VisionLanguageModel("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", ("7b", "3b", "tiny"),
                        _loader("Qwen25VLForConditionalGeneration"), _qwen_config, _qwen_batch,
                        fixed_resolution=False),
    VisionLanguageModel("qwen3-vl", "Qwen3VLForConditionalGeneration", ("qwen3-vl-8b", "tiny"),
                        _loader("Qwen3VLForConditionalGeneration"), _qwen3_config, _qwen3_batch,
                        fixed_resolution=False),
    VisionLanguageModel("llava", "LlavaForConditionalGeneration", ("llava-1.5-7b", "tiny"),
                        _loader("LlavaForConditionalGeneration"), _llava_config, _llava_batch),
    VisionLanguageModel("blip2", "Blip2ForConditionalGeneration", ("opt-2.7b", "tiny"),
                        _loader("Blip2ForConditionalGeneration"), _blip2_config, _blip2_batch),
)}
