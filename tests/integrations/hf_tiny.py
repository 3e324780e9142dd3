"""Tiny random-weight models of every transformers family mmfast.patch supports, with
inputs shaped like the real checkpoints' (scaled down: several images per sample, Mllama's
4 tiles, left padding), for the drop-in differential tests.

A :class:`Case` builds a model (eval mode, seeded), its inputs, and picks the tensors to
compare from its output. ``attn_implementation`` is the one the model is built with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import mmfast

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 128
LM = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@dataclass
class Case:
    name: str
    build: Callable[[str], torch.nn.Module]  # attn_implementation -> model
    inputs: Callable[[], dict]
    pick: Callable[[object], tuple] = lambda out: (out.logits,)
    generative: bool = True
    has_lm_attention: bool = True  # a decoder self-attention the "mmfast" implementation runs
    tol: float = 2e-4


def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return ids, mask


def _text(n: int, gen: torch.Generator, low: int = 3, high: int = 100) -> list[int]:
    return torch.randint(low, high, (n,), generator=gen).tolist()


# ---- causal LMs -------------------------------------------------------------------------


def _causal(arch: str):
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]

    def build(attn):
        return model_class(config_class(**LM, attn_implementation=attn)).eval()

    def inputs():
        gen = torch.Generator().manual_seed(1)
        ids, mask = _left_padded([_text(9, gen), _text(6, gen)])
        return {"input_ids": ids, "attention_mask": mask}

    return Case(arch, build, inputs)


# ---- CLIP / SigLIP ----------------------------------------------------------------------

VIT = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
       "image_size": 32, "patch_size": 8}
TEXT_TOWER = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
              "vocab_size": 99, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 98}


def _clip(attn):
    config = transformers.CLIPConfig(text_config=TEXT_TOWER, vision_config={**VIT, "hidden_act": "quick_gelu"},
                                     projection_dim=16, attn_implementation=attn)
    return transformers.CLIPModel(config).eval()


def _siglip(attn):
    config = transformers.SiglipConfig(text_config=TEXT_TOWER, vision_config=VIT, attn_implementation=attn)
    return transformers.SiglipModel(config).eval()


def _dual_inputs():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 98, (3, 7), generator=gen)
    ids[:, -1] = 98  # the end token, where CLIP pools
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}


def _dual_pick(out):
    return out.logits_per_image, out.text_embeds, out.image_embeds


# ---- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------

QWEN_TEXT = {**LM, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
IMAGE, VSTART, VEND = 120, 122, 123


def _qwen2_vl(attn):
    return transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
        text_config=QWEN_TEXT, image_token_id=IMAGE, video_token_id=121, vision_start_token_id=VSTART,
        vision_end_token_id=VEND, attn_implementation=attn,
        vision_config={"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 64,
                       "patch_size": 4})).eval()


def _qwen2_5_vl(attn):
    return transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=QWEN_TEXT, image_token_id=IMAGE, video_token_id=121, vision_start_token_id=VSTART,
        vision_end_token_id=VEND, attn_implementation=attn,
        vision_config={"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48,
                       "out_hidden_size": 64, "patch_size": 4, "window_size": 16, "fullatt_block_indexes": [1]}
    )).eval()


def _qwen_inputs():
    """Sample 0: two images (4x4 and 4x8 patches); sample 1: one (4x4), left padded."""
    gen = torch.Generator().manual_seed(1)
    grid = torch.tensor([[1, 4, 4], [1, 4, 8], [1, 4, 4]])
    tokens = (grid.prod(-1) // 4).tolist()  # 2x2 patches merge into one token
    image = lambda n: [VSTART] + [IMAGE] * n + [VEND]  # noqa: E731
    ids, mask = _left_padded([_text(2, gen) + image(tokens[0]) + _text(2, gen) + image(tokens[1]) + _text(3, gen),
                              _text(3, gen) + image(tokens[2]) + _text(2, gen)])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grid,
            "mm_token_type_ids": (ids == IMAGE).long()}  # 1: an image token


# ---- Qwen3-VL ---------------------------------------------------------------------------

VIDEO = 121
QWEN3_TEXT = {**LM, "head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [2, 3, 3], "mrope_interleaved": True}}
# A 4x4 learned position grid, resampled to every image's grid; DeepStack from blocks 0
# and 2 into the first two language-model layers.
QWEN3_VISION = {"depth": 3, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48, "out_hidden_size": 64,
                "patch_size": 4, "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 2]}


def qwen3_vl_config(attn="sdpa", vision=None, text=None):
    return transformers.Qwen3VLConfig(
        text_config={**QWEN3_TEXT, **(text or {})}, vision_config={**QWEN3_VISION, **(vision or {})},
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        attn_implementation=attn)


def _qwen3_vl(attn):
    return transformers.Qwen3VLForConditionalGeneration(qwen3_vl_config(attn)).eval()


def qwen3_vl_inputs(patch_values: int = 3 * 2 * 4 * 4):
    """Sample 0: an image (4x4 patches), a 2-frame video (4x4 each: its frames are
    separate groups, split by a timestamp token, as Qwen3-VL's processor emits them) and
    an image (4x8); sample 1: one image (6x4, a grid the 4x4 table is stretched to), left
    padded."""
    gen = torch.Generator().manual_seed(1)
    grid = torch.tensor([[1, 4, 4], [1, 4, 8], [1, 6, 4]])
    video_grid = torch.tensor([[2, 4, 4]])
    tokens = (grid.prod(-1) // 4).tolist()
    span = lambda n, token=IMAGE: [VSTART] + [token] * n + [VEND]  # noqa: E731
    video = span(4, VIDEO) + _text(1, gen) + span(4, VIDEO)
    ids, mask = _left_padded([
        _text(2, gen) + span(tokens[0]) + _text(2, gen) + video + _text(1, gen) + span(tokens[1]) + _text(3, gen),
        _text(3, gen) + span(tokens[2]) + _text(2, gen)])
    pixels = torch.randn(int(grid.prod(-1).sum()), patch_values, generator=gen)
    video_pixels = torch.randn(int(video_grid.prod(-1).sum()), patch_values, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grid,
            "pixel_values_videos": video_pixels, "video_grid_thw": video_grid,
            "mm_token_type_ids": (ids == IMAGE).long() + 2 * (ids == VIDEO).long()}


# ---- LLaVA ------------------------------------------------------------------------------

LLAVA_IMAGE = 127


def _llava(attn):
    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 48,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        text_config={"model_type": "llama", **LM}, image_token_id=LLAVA_IMAGE, attn_implementation=attn)).eval()


def _llava_inputs():
    """Sample 0: two images; sample 1: one, left padded (4 tokens per 28 px image)."""
    gen = torch.Generator().manual_seed(1)
    image = [LLAVA_IMAGE] * 4
    ids, mask = _left_padded([_text(2, gen) + image + _text(2, gen) + image + _text(2, gen),
                              _text(3, gen) + image + _text(1, gen)])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, 28, 28, generator=gen)}


# ---- BLIP-2 -----------------------------------------------------------------------------

BLIP_IMAGE, QUERIES = 127, 4


def _blip2(attn):
    return transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14},
        qformer_config={"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 48, "num_hidden_layers": 2,
                        "encoder_hidden_size": 32},
        text_config={"model_type": "opt", "hidden_size": 32, "ffn_dim": 48, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "vocab_size": VOCAB, "word_embed_proj_dim": 32, "pad_token_id": 0,
                     "bos_token_id": 1, "eos_token_id": 2},
        num_query_tokens=QUERIES, image_token_id=BLIP_IMAGE, attn_implementation=attn)).eval()


def _blip2_inputs():
    gen = torch.Generator().manual_seed(1)
    image = [BLIP_IMAGE] * QUERIES
    ids, mask = _left_padded([image + _text(5, gen), image + _text(3, gen)])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 28, 28, generator=gen)}


# ---- Idefics2 ---------------------------------------------------------------------------

IDEFICS_IMAGE, LATENTS = 127, 3


def _idefics2(attn):
    model = transformers.Idefics2ForConditionalGeneration(transformers.Idefics2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14},
        perceiver_config={"hidden_size": 64, "resampler_n_latents": LATENTS, "resampler_depth": 2,
                          "resampler_n_heads": 4, "resampler_head_dim": 16, "num_key_value_heads": 2},
        text_config={"model_type": "mistral", **LM}, image_token_id=IDEFICS_IMAGE, attn_implementation=attn))
    torch.nn.init.normal_(model.model.connector.perceiver_resampler.latents)
    return model.eval()


def _idefics2_inputs():
    """Sample 0: two images; sample 1: one (the other slot is padding), left padded."""
    gen = torch.Generator().manual_seed(1)
    image = [IDEFICS_IMAGE] * LATENTS
    ids, mask = _left_padded([_text(2, gen) + image + _text(1, gen) + image + _text(2, gen),
                              _text(3, gen) + image + _text(2, gen)])
    pixels = torch.randn(2, 2, 3, 28, 28, generator=gen)
    pixels[1, 1] = 0  # an all-zero image is padding to Idefics2
    pixel_mask = torch.ones(2, 2, 28, 28, dtype=torch.bool)
    pixel_mask[0, 1, 20:, :] = False  # the second image of sample 0 is smaller than the canvas
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "pixel_attention_mask": pixel_mask}


# ---- Mllama -----------------------------------------------------------------------------

MLLAMA_IMAGE, TILES = 127, 4
RATIOS = [[1, 1], [1, 2], [2, 1], [1, 3], [3, 1], [1, 4], [2, 2], [4, 1]]


def _mllama(attn, tiles=TILES):
    model = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_global_layers": 1,
                       "attention_heads": 2, "vision_output_dim": 64, "intermediate_layers_indices": [0],
                       "image_size": 16, "patch_size": 8, "max_num_tiles": tiles,
                       "supported_aspect_ratios": RATIOS[:1 if tiles == 1 else None]},
        text_config={**{k: v for k, v in LM.items() if k != "num_hidden_layers"}, "num_hidden_layers": 3,
                     "cross_attention_layers": [1]},
        image_token_index=MLLAMA_IMAGE, attn_implementation=attn))
    layer = model.model.language_model.layers[1]
    with torch.no_grad():  # the gates start at 0, which would hide the cross-attention
        layer.cross_attn_attn_gate.fill_(0.7)
        layer.cross_attn_mlp_gate.fill_(-0.4)
    return model.eval()


def _mllama_inputs(tiles=TILES):
    """Sample 0: two images (4 tiles, 2 tiles); sample 1: one (3 tiles), left padded."""
    gen = torch.Generator().manual_seed(1)
    ids, mask = _left_padded([[MLLAMA_IMAGE] + _text(2, gen) + [MLLAMA_IMAGE] + _text(4, gen),
                              [MLLAMA_IMAGE] + _text(4, gen)])
    used = [[tiles, min(2, tiles)], [min(3, tiles), 0]]
    cross = torch.zeros(2, ids.shape[1], 2, tiles, dtype=torch.long)
    aspect_mask = torch.zeros(2, 2, tiles, dtype=torch.long)
    ratio_id = {k: RATIOS.index([1, k]) + 1 for k in range(1, tiles + 1)}  # ids are 1-based
    aspect_ids = torch.zeros(2, 2, dtype=torch.long)
    for b in range(2):
        positions = (ids[b] == MLLAMA_IMAGE).nonzero().flatten().tolist()
        for i, start in enumerate(positions):
            cross[b, start:, i, :used[b][i]] = 1
            aspect_mask[b, i, :used[b][i]] = 1
            aspect_ids[b, i] = ratio_id[used[b][i]]
    pixels = torch.randn(2, 2, tiles, 3, 16, 16, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "aspect_ratio_ids": aspect_ids,
            "aspect_ratio_mask": aspect_mask, "cross_attention_mask": cross}


CASES = {case.name: case for case in [
    Case("clip", _clip, _dual_inputs, _dual_pick, generative=False, has_lm_attention=False),
    Case("siglip", _siglip, _dual_inputs, _dual_pick, generative=False, has_lm_attention=False),
    Case("qwen2_vl", _qwen2_vl, _qwen_inputs),
    Case("qwen2_5_vl", _qwen2_5_vl, _qwen_inputs),
    Case("qwen3_vl", _qwen3_vl, qwen3_vl_inputs),
    Case("llava", _llava, _llava_inputs),
    Case("blip2", _blip2, _blip2_inputs, has_lm_attention=False),
    Case("idefics2", _idefics2, _idefics2_inputs, has_lm_attention=False),
    Case("mllama", _mllama, _mllama_inputs, has_lm_attention=False),
    _causal("llama"), _causal("qwen2"), _causal("mistral"),
]}


def build(name: str, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return CASES[name].build(attn)


@pytest.fixture(autouse=True)
def torch_backend_on_one_thread():
    """Imported by the drop-in test modules: autouse there."""
    # One intra-op thread: these models are tiny, and on a shared CPU two threads spin
    # against other processes (measured: 4 min for this set with 2 threads, 36 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mmfast.set_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)
