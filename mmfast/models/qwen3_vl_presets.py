"""Named Qwen3-VL configurations: ``tiny`` (a CPU runs it in well under a second) and
``qwen3-vl-8b``, for building models with random weights (profiling without checkpoints).

    >>> model = Qwen3VLForConditionalGeneration.from_preset("tiny")
    >>> with torch.device("cuda"):
    ...     big = Qwen3VLForConditionalGeneration.from_preset("qwen3-vl-8b").to(torch.bfloat16)

``qwen3-vl-8b`` holds the values of the published ``config.json`` of
Qwen/Qwen3-VL-8B-Instruct: text: vocab 151936, hidden 4096, intermediate 12288, 36
layers, 32 heads (8 KV heads) of head dim 128, RMSNorm eps 1e-6, rope theta 5e6,
interleaved M-RoPE sections (24, 20, 20), untied embeddings; vision: depth 27, hidden
1152, 16 heads (head dim 72), GELU-tanh MLP 4304, patch 16 (temporal 2), merge 2, a
48 x 48 position grid (2304), DeepStack from blocks 8, 16, 24, out 4096; tokens: image
151655, video 151656, vision start 151652 / end 151653, eos 151645.
"""

from __future__ import annotations

from mmfast.models.qwen3_vl import Qwen3VLConfig

QWEN3_VL_PRESETS = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rope_theta=10000.0, mrope_section=(2, 3, 3), image_token_id=250,
                 video_token_id=251, vision_start_token_id=252, vision_end_token_id=253, eos_token_id=254,
                 pad_token_id=0,
                 vision={"depth": 3, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "patch_size": 16,
                         "num_position_embeddings": 16, "deepstack_visual_indexes": (0, 1)}),
    "qwen3-vl-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                        rope_theta=5000000.0, mrope_section=(24, 20, 20), tie_word_embeddings=False,
                        vision={"depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
                                "out_hidden_size": 4096, "patch_size": 16, "temporal_patch_size": 2,
                                "in_channels": 3, "spatial_merge_size": 2, "num_position_embeddings": 2304,
                                "deepstack_visual_indexes": (8, 16, 24), "hidden_act": "gelu_pytorch_tanh"}),
}


def qwen3_vl_preset(name: str) -> Qwen3VLConfig:
    """The :class:`Qwen3VLConfig` of a preset: 'tiny' or 'qwen3-vl-8b'."""
    if name not in QWEN3_VL_PRESETS:
        raise ValueError(f"name: unknown Qwen3-VL preset {name!r} (known: {', '.join(QWEN3_VL_PRESETS)})")
    fields = dict(QWEN3_VL_PRESETS[name])
    fields["vision"] = dict(fields["vision"])
    return Qwen3VLConfig(**fields, raw={"architectures": ["Qwen3VLForConditionalGeneration"], "preset": name})
