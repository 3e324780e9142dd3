"""Named Qwen2.5-VL configurations: ``tiny`` (a CPU runs it in well under a second) and the
released sizes, for building models with random weights (profiling without checkpoints).

    >>> model = Qwen25VLForConditionalGeneration.from_preset("tiny")
    >>> with torch.device("cuda"):
    ...     big = Qwen25VLForConditionalGeneration.from_preset("7b").to(torch.bfloat16)

The real sizes are the values of the published ``config.json`` files of
Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct.
"""

from __future__ import annotations

from mmfast.models.qwen25_vl import Qwen25VLConfig

_VISION_RELEASED = {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                    "patch_size": 14, "temporal_patch_size": 2, "in_channels": 3, "spatial_merge_size": 2,
                    "window_size": 112, "fullatt_block_indexes": (7, 15, 23, 31)}

QWEN25_VL_PRESETS = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, mrope_section=(2, 3, 3), image_token_id=250,
                 video_token_id=251, vision_start_token_id=252, eos_token_id=253, pad_token_id=0,
                 vision={"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "patch_size": 14,
                         "window_size": 56, "fullatt_block_indexes": (1,)}),
    "3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
               vision={**_VISION_RELEASED, "out_hidden_size": 2048}),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vision={**_VISION_RELEASED, "out_hidden_size": 3584}),
}


# The text model's bos id, which only the config.json carries (mmfast's model never reads it):
# the released one, and inside the tiny vocabulary for tiny (transformers warns otherwise).
QWEN25_VL_BOS = {"tiny": 1, "3b": 151643, "7b": 151643}


def qwen25_vl_preset(name: str) -> Qwen25VLConfig:
    """The :class:`Qwen25VLConfig` of a preset: 'tiny', '3b' or '7b'."""
    if name not in QWEN25_VL_PRESETS:
        raise ValueError(f"name: unknown Qwen2.5-VL preset {name!r} (known: {', '.join(QWEN25_VL_PRESETS)})")
    fields = dict(QWEN25_VL_PRESETS[name])
    fields["vision"] = dict(fields["vision"])
    raw = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "preset": name,
           "text_config": {"bos_token_id": QWEN25_VL_BOS[name]}}
    return Qwen25VLConfig(**fields, raw=raw)
