"""Connector modules against tiny random-weight Hugging Face counterparts: the HF
state_dict loads into the mmfast module (strict) and outputs match in float32."""

import pytest
import torch

from mmfast.nn import GatedCrossAttentionBlock, MLPProjector, PerceiverResampler
from mmfast.ops.cross_attention_masks import ImagesUpToPositionMask

transformers = pytest.importorskip("transformers")


def _load(ours, theirs):
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


def test_mlp_projector_matches_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=24), text_config=LlamaConfig(hidden_size=32))
    ours, theirs = _load(MLPProjector(24, 32, act=config.projector_hidden_act), LlavaMultiModalProjector(config))
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(ours(x), theirs(x))


def test_perceiver_matches_idefics2(device):
    from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    config = Idefics2PerceiverConfig(hidden_size=32, resampler_n_latents=5, resampler_depth=2,
                                     resampler_n_heads=4, resampler_head_dim=16, num_key_value_heads=2)
    config._attn_implementation = "eager"
    theirs = Idefics2PerceiverResampler(config)
    torch.nn.init.normal_(theirs.latents)
    ours, theirs = _load(PerceiverResampler.from_config(config), theirs)
    ours, theirs = ours.to(device), theirs.to(device)
    context = torch.randn(2, 11, 32, device=device)
    attention_mask = torch.ones(2, 11, dtype=torch.long, device=device)
    attention_mask[1, 3:7] = 0  # padding in the middle, as a 2-D patch grid gives
    with torch.no_grad():
        torch.testing.assert_close(ours(context, attention_mask), theirs(context, attention_mask),
                                   atol=2e-5, rtol=1e-4)


def _mllama_masks(device):
    """HF's dense cross_attention_mask [B, T, images, tiles] and the same as our mask type."""
    positions = torch.tensor([[1, 4], [3, -1]], device=device)
    tiles = torch.tensor([[2, 1], [1, 0]], device=device)
    text, max_tiles, patches = 7, 2, 3
    t = torch.arange(text, device=device)[None, :, None, None]
    follows = (positions[:, None, :, None] >= 0) & (positions[:, None, :, None] <= t)
    dense = (follows & (torch.arange(max_tiles, device=device) < tiles[:, None, :, None])).long()
    offsets = torch.arange(2, device=device).expand(2, 2) * max_tiles * patches
    ours = ImagesUpToPositionMask(positions, tiles * patches, offsets, empty_rows_see_all_keys=True)
    return dense, ours, patches


def test_gated_block_matches_mllama(device):
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig
    from transformers.models.mllama.modeling_mllama import (MllamaCrossAttentionDecoderLayer,
                                                            _prepare_cross_attention_mask)

    config = MllamaTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=48, num_hidden_layers=1, cross_attention_layers=[0])
    config._attn_implementation = "eager"
    theirs = MllamaCrossAttentionDecoderLayer(config, layer_idx=0)
    with torch.no_grad():
        theirs.cross_attn_attn_gate.fill_(0.8)
        theirs.cross_attn_mlp_gate.fill_(-0.6)
    ours, theirs = _load(GatedCrossAttentionBlock.from_config(config), theirs)
    ours, theirs = ours.to(device), theirs.to(device)
    dense, mask, patches = _mllama_masks(device)
    additive, rows = _prepare_cross_attention_mask(dense, num_vision_tokens=patches, dtype=torch.float32)
    x = torch.randn(2, 7, 64, device=device)
    image = torch.randn(2, 12, 64, device=device)
    with torch.no_grad():
        expected = theirs(x, image, additive, None, rows)
        got = ours(x, image, mask=mask, sees_any=rows[:, 0])
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
