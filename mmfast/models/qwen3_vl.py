"""Qwen3-VL: the mmfast Qwen3-VL vision tower + the mmfast decoder in its Qwen3 form,
Hugging Face's weights.

``Qwen3VLForConditionalGeneration`` takes what Hugging Face's processor emits, as
:class:`~mmfast.models.qwen25_vl.Qwen25VLForConditionalGeneration` does (``input_ids``
with image / video placeholders, ``attention_mask`` for padding on either side,
``pixel_values`` / ``image_grid_thw``, ``pixel_values_videos`` / ``video_grid_thw``), and
runs the same way: vision features replace the placeholders, the decoder runs over the
prompts packed into one stream, ``generate`` decodes with a KV cache. What differs:

- the vision tower (:class:`~mmfast.nn.qwen3_vision.Qwen3VisionTransformer`) also
  returns DeepStack features, which the decoder adds to the visual tokens' hidden states
  after its first layers (one feature map per layer, images and videos alike);
- the decoder is Qwen3: per-head q/k RMSNorm, explicit head_dim, interleaved M-RoPE;
- a video's frames are separate placeholder runs (the processor puts a timestamp between
  them), each placed as a one-frame grid (``video_grid_thw`` row (t, h, w) stands for t
  frames of (1, h, w)), as transformers' Qwen3-VL ``get_rope_index`` does; there is no
  ``second_per_grid_ts``.

Checkpoints: ``from_pretrained(dir)`` reads a transformers directory (config.json with
``text_config`` / ``vision_config``, transformers 4.57's ``rope_scaling`` + ``rope_theta``
or 5's ``rope_parameters``; safetensors named ``model.visual.*``,
``model.language_model.*``, ``lm_head.*``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

from mmfast.models.checkpoint import register_architecture
from mmfast.models.mrope_index import mrope_position_ids
from mmfast.models.packing import pack_prompts
from mmfast.models.qwen25_vl import Qwen25VLForConditionalGeneration, _Prompt
from mmfast.models.qwen_vl_backbone import QwenVLBackbone
from mmfast.models.qwen_vl_config import read_text_settings, read_vision_settings, write_config, write_vision_config
from mmfast.nn.qwen3_vision import Qwen3VisionTransformer

VISION_KEYS = ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "patch_size",
               "temporal_patch_size", "in_channels", "spatial_merge_size", "num_position_embeddings",
               "deepstack_visual_indexes", "hidden_act")


@dataclass
class Qwen3VLConfig:
    """The fields of a Hugging Face ``Qwen3VLConfig`` the model uses (text fields under
    ``text_config`` or at the top level; vision fields under ``vision_config``).
    Defaults: Qwen3-VL-8B."""
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5000000.0
    mrope_section: tuple = (24, 20, 20)
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: Optional[Union[int, list]] = 151645
    pad_token_id: Optional[int] = None
    vision: dict = field(default_factory=dict)  # keyword arguments of Qwen3VisionTransformer
    raw: dict = field(default_factory=dict)     # the config.json it came from

    @classmethod
    def from_dict(cls, config: dict) -> "Qwen3VLConfig":
        text = read_text_settings(config, model_name="Qwen3-VL", default_rope_theta=cls.rope_theta,
                                  default_mrope_section=cls.mrope_section)
        vision = read_vision_settings(config, VISION_KEYS)
        if "deepstack_visual_indexes" in vision:
            vision["deepstack_visual_indexes"] = tuple(vision["deepstack_visual_indexes"])
        kwargs = {name: text.fields[name] for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "attention_bias", "tie_word_embeddings",
            "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "eos_token_id",
            "pad_token_id") if text.fields.get(name) is not None}
        return cls(**kwargs, rope_theta=text.rope_theta, mrope_section=text.mrope_section, vision=vision,
                   raw=dict(config))

    def to_dict(self) -> dict:
        """A transformers-5 style config.json dict (over the one it was read from, if any)."""
        text = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "hidden_act": "silu",
                "attention_bias": self.attention_bias, "pad_token_id": self.pad_token_id,
                "model_type": "qwen3_vl_text",
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                    "mrope_section": list(self.mrope_section), "mrope_interleaved": True}}
        vision = write_vision_config(self.vision, self.hidden_size, model_type="qwen3_vl_vision")
        # 4.57's rope_scaling / rope_theta of a released config.json: rope_parameters replaces them.
        return write_config(self.raw, architecture="Qwen3VLForConditionalGeneration", model_type="qwen3_vl",
                            text=text, vision=vision, stale_text_keys=("rope_scaling", "rope_theta"),
                            top={"image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                                 "vision_start_token_id": self.vision_start_token_id,
                                 "vision_end_token_id": self.vision_end_token_id, "eos_token_id": self.eos_token_id,
                                 "tie_word_embeddings": self.tie_word_embeddings})


def _frames(video_grid_thw: Optional[Tensor]) -> Optional[Tensor]:
    """One (1, h, w) row per frame of every video: each frame is its own placeholder run."""
    if video_grid_thw is None:
        return None
    if video_grid_thw.dim() != 2 or video_grid_thw.shape[-1] != 3:
        raise ValueError(f"video_grid_thw: expected [N, 3] (t, h, w per video), got shape "
                         f"{tuple(video_grid_thw.shape)}")
    frames = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
    frames[:, 0] = 1
    return frames


@register_architecture("Qwen3VLForConditionalGeneration")
class Qwen3VLForConditionalGeneration(Qwen25VLForConditionalGeneration):
    """Qwen3-VL on mmfast kernels; state dict names equal transformers 5's
    ``Qwen3VLForConditionalGeneration`` (see the module docstring). ``forward``,
    ``generate``, ``from_pretrained`` and ``save_pretrained`` are Qwen2.5-VL's (without
    ``second_per_grid_ts``)."""

    config_class = Qwen3VLConfig

    @staticmethod
    def build_backbone(config: Qwen3VLConfig) -> QwenVLBackbone:
        """``model.visual`` (:class:`Qwen3VisionTransformer`) and ``model.language_model`` in
        its Qwen3 form (q/k norm, explicit head_dim, interleaved M-RoPE)."""
        return QwenVLBackbone(config, Qwen3VisionTransformer, qkv_bias=config.attention_bias,
                              o_bias=config.attention_bias, head_dim=config.head_dim, qk_norm=True,
                              mrope_interleaved=True)

    @classmethod
    def from_preset(cls, name: str) -> "Qwen3VLForConditionalGeneration":
        """A randomly initialised model of a named size ('tiny', 'qwen3-vl-8b'; see
        :mod:`mmfast.models.qwen3_vl_presets`)."""
        from mmfast.models.qwen3_vl_presets import qwen3_vl_preset

        return cls(qwen3_vl_preset(name))

    def _prompt(self, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                video_grid_thw, second_per_grid_ts) -> _Prompt:
        if second_per_grid_ts is not None:
            raise ValueError("second_per_grid_ts: Qwen3-VL places video frames by the timestamp tokens between "
                             "them and takes no second_per_grid_ts")
        config = self.config
        packed = pack_prompts(input_ids, attention_mask)
        ids, mask, lengths = packed.ids, packed.mask, packed.lengths
        position_ids, deltas = mrope_position_ids(
            input_ids, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
            spatial_merge_size=self.model.visual.spatial_merge_size, image_grid_thw=image_grid_thw,
            video_grid_thw=_frames(video_grid_thw), tokens_per_second=1.0, attention_mask=mask)
        embeds = self.model.language_model.embed_tokens(ids)
        deepstack = []
        for kind, pixels, grid in (("image", pixel_values, image_grid_thw),
                                   ("video", pixel_values_videos, video_grid_thw)):
            vision = self._vision_features(pixels, grid, kind)
            slots = ids == (config.image_token_id if kind == "image" else config.video_token_id)
            count = int(slots.sum())
            if vision is None:
                if count:
                    raise ValueError(f"input_ids: {count} {kind} placeholder tokens but no {kind} inputs were given")
                continue
            if count != vision.merged.shape[0]:
                raise ValueError(f"input_ids: {count} {kind} placeholder tokens, but {kind}_grid_thw gives "
                                 f"{vision.merged.shape[0]} {kind} features (t * h * w / merge^2 per {kind})")
            embeds = embeds.masked_scatter(slots[:, None], vision.merged.to(embeds.dtype))
            if vision.deepstack:
                deepstack.append((slots.nonzero().flatten(), vision.deepstack))
        next_position = deltas.view(-1) + torch.tensor(lengths, device=deltas.device)
        return _Prompt(embeds, position_ids[:, mask], packed.cu_seqlens, lengths, mask, next_position, deepstack)
