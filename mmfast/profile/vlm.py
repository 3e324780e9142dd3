"""The Qwen2.5-VL workload: mmfast's model and transformers' ``Qwen2_5_VLForConditionalGeneration``
(sdpa attention) with the same config and weights, greedy generation over a batch of
one-image prompts.

Time to first token is one ``generate`` call with a single new token (vision tower +
prefill + first token); decode tokens/s comes from the extra time of a call with
``new_tokens`` tokens. End-of-sequence is disabled so both sides produce every token.

With ``compile_reference`` a third side runs transformers' model with its ``forward``
under ``torch.compile`` (dynamic shapes, so the growing cache does not recompile every
step; its data-dependent rope/window index code breaks the graph where it must).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable

import torch

PRESETS = ("tiny", "3b", "7b")
TEXT_TOKENS = 16  # text around each image: half before, half after


@dataclass
class Side:
    name: str
    generate: Callable[[int], object]  # new tokens -> output


def _hf_config(config):
    import transformers

    hf = transformers.Qwen2_5_VLConfig(**config.to_dict())
    hf._attn_implementation = "sdpa"
    return hf


def build(preset: str, checkpoint: str | None, device: torch.device, dtype: torch.dtype):
    """(mmfast model, transformers model, description) with equal weights. The transformers
    model is built from mmfast's config and takes mmfast's state dict (the names are equal),
    so a checkpoint is read once."""
    import transformers

    from mmfast.models import Qwen25VLForConditionalGeneration

    torch.manual_seed(0)
    # Built in the target dtype on the target device: a float32 7B pair would not fit beside each other.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if checkpoint is not None:
                ours = Qwen25VLForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype, device=device)
            else:
                ours = Qwen25VLForConditionalGeneration.from_preset(preset).to(dtype)
            reference = transformers.Qwen2_5_VLForConditionalGeneration(_hf_config(ours.config)).to(dtype)
    finally:
        torch.set_default_dtype(previous)
    reference.load_state_dict(ours.state_dict())
    description = f"checkpoint {checkpoint}" if checkpoint is not None else f"preset {preset} (random weights)"
    return ours.eval(), reference.eval(), description


def inputs(model, batch: int, resolution: int, device: torch.device, dtype: torch.dtype) -> dict:
    """A batch of prompts, each: text, one square image of ``resolution`` pixels, text."""
    config = model.config
    vision = model.model.visual
    patch, merge = vision.patch_size, vision.spatial_merge_size
    side = max(1, round(resolution / (patch * merge))) * merge  # patches per side, a multiple of merge
    image_tokens = side * side // merge**2
    text_top = min(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                   *([config.eos_token_id] if isinstance(config.eos_token_id, int) else config.eos_token_id or []))
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(1, text_top, (batch, n), generator=g)  # noqa: E731
    ids = torch.cat([text(TEXT_TOKENS // 2), torch.full((batch, 1), config.vision_start_token_id),
                     torch.full((batch, image_tokens), config.image_token_id), text(TEXT_TOKENS // 2)], dim=1)
    patch_dim = config.vision.get("in_channels", 3) * config.vision.get("temporal_patch_size", 2) * patch * patch
    pixels = torch.randn(batch * side * side, patch_dim, generator=g)
    grid = torch.tensor([[1, side, side]] * batch)
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device, dtype), "image_grid_thw": grid.to(device),
            "pixels": side * patch}


def compiled(reference, backend: str):
    """A shallow copy of ``reference`` (same submodules and weights) whose forward is compiled."""
    twin = copy.copy(reference)
    twin.forward = torch.compile(reference.forward, backend=backend, dynamic=True)
    return twin


def sides(ours, reference, batch_inputs: dict, compile_backend: str | None = None) -> list[Side]:
    """mmfast and transformers (sdpa), and with ``compile_backend`` transformers under
    torch.compile with that backend."""
    ids, pixels, grid = batch_inputs["input_ids"], batch_inputs["pixel_values"], batch_inputs["image_grid_thw"]
    image_token = ours.config.image_token_id

    def run_ours(new_tokens):
        return ours.generate(ids, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=new_tokens,
                             eos_token_id=[])

    def runner(model):
        @torch.no_grad()
        def run_reference(new_tokens):
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                  image_grid_thw=grid, mm_token_type_ids=(ids == image_token).int(),
                                  do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return run_reference

    listed = [Side("mmfast", run_ours), Side("transformers (sdpa)", runner(reference))]
    if compile_backend is not None:
        listed.append(Side("transformers (sdpa) + torch.compile", runner(compiled(reference, compile_backend))))
    return listed


def metrics(batch: int, prompt_tokens: int, new_tokens: int, first_s: float, full_s: float) -> dict:
    decode_s = full_s - first_s
    return {
        "images_per_s": batch / first_s,
        "prefill_tokens_per_s": batch * prompt_tokens / first_s,
        "time_to_first_token_s": first_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else None,
        "generate_s": full_s,
    }


def check_checkpoint(path: str | None) -> None:
    if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--checkpoint: {path} is not a transformers model directory (no config.json there)")
