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
    ours, theirs = _load(MLPProjector.from_config(config), LlavaMultiModalProjector(config))
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


def _tiny_qformer_config(text_input: bool):
    from transformers import Blip2QFormerConfig

    config = Blip2QFormerConfig(hidden_size=32, num_attention_heads=4, intermediate_size=37, num_hidden_layers=2,
                                cross_attention_frequency=2, encoder_hidden_size=24,
                                use_qformer_text_input=text_input)
    config._attn_implementation = "eager"
    return config


def test_qformer_matches_blip2_with_text_and_text_padding(device):
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

    from mmfast.nn import QFormer

    config = _tiny_qformer_config(text_input=True)
    ours, theirs = _load(QFormer(config), Blip2QFormerModel(config))
    ours, theirs = ours.to(device), theirs.to(device)
    queries, text = 5, 4
    embeds = torch.randn(2, queries + text, 32, device=device)
    image = torch.randn(2, 13, 24, device=device)
    attention_mask = torch.ones(2, queries + text, dtype=torch.long, device=device)
    attention_mask[1, -2:] = 0  # text padding
    # (transformers' own Q-Former fails with text and an encoder_attention_mask together: it
    # sizes the image mask for all tokens, not the queries; the image mask is tested below.)
    expected = theirs(query_embeds=embeds, query_length=queries, attention_mask=attention_mask,
                      encoder_hidden_states=image).last_hidden_state
    got = ours(embeds, image, query_length=queries, attention_mask=attention_mask)
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-4)


def test_qformer_queries_image_padding_and_gradients_match(device):
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

    from mmfast.nn import QFormer

    config = _tiny_qformer_config(text_input=False)
    ours, theirs = _load(QFormer(config), Blip2QFormerModel(config))
    ours, theirs = ours.to(device), theirs.to(device)
    embeds = torch.randn(2, 6, 32, device=device)
    image = torch.randn(2, 11, 24, device=device, requires_grad=True)
    image_mask = torch.ones(2, 11, dtype=torch.long, device=device)
    image_mask[0, 7:] = 0
    upstream = torch.randn(2, 6, 32, device=device)
    got = ours(embeds, image, image_mask)
    (grad_ours,) = torch.autograd.grad(got, image, upstream)
    expected = theirs(query_embeds=embeds, encoder_hidden_states=image,
                      encoder_attention_mask=image_mask).last_hidden_state
    (grad_theirs,) = torch.autograd.grad(expected, image, upstream)
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(grad_ours, grad_theirs, atol=3e-5, rtol=1e-4)


class _QwenVLReference(torch.nn.Module):
    """Qwen-VL's Resampler as its remote code writes it (nn.MultiheadAttention, sequence
    first), with the MAE sin-cos table built in numpy style: the float64 oracle."""

    def __init__(self, grid_size, embed_dim, num_heads, kv_dim):
        super().__init__()
        import numpy as np

        def one_d(dim, pos):
            omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
            out = np.einsum("m,d->md", pos.reshape(-1), omega)
            return np.concatenate([np.sin(out), np.cos(out)], axis=1)

        grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64)))
        table = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
        self.pos_embed = torch.nn.Parameter(torch.from_numpy(table).float(), requires_grad=False)
        self.query = torch.nn.Parameter(torch.randn(grid_size**2, embed_dim) * 0.02)
        self.kv_proj = torch.nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = torch.nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = torch.nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = torch.nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x):
        side, src = int(x.shape[1] ** 0.5), int(self.pos_embed.shape[0] ** 0.5)
        pos = self.pos_embed
        if side != src:
            pos = torch.nn.functional.interpolate(
                pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(side, side), mode="bicubic",
                align_corners=False).permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        q = self.ln_q(self.query)
        out = self.attn(q.unsqueeze(1).repeat(1, x.shape[1], 1) + self.pos_embed.unsqueeze(1),
                        x + pos.unsqueeze(1), x)[0]
        return out.permute(1, 0, 2)


@pytest.mark.parametrize("tokens", [16, 25], ids=["same-grid", "resized-grid"])
def test_qwen_vl_resampler_matches_reference(tokens, device):
    from mmfast.nn import QwenVLResampler

    reference = _QwenVLReference(grid_size=4, embed_dim=64, num_heads=2, kv_dim=48).double().eval()
    ours = QwenVLResampler(grid_size=4, embed_dim=64, num_heads=2, kv_dim=48)
    # Our own sin-cos table is the reference's (the state_dict below would overwrite it).
    torch.testing.assert_close(ours.pos_embed, reference.pos_embed.float())
    ours.load_state_dict({k: v.float() for k, v in reference.state_dict().items()}, strict=True)
    ours = ours.to(device).eval()
    x = torch.randn(2, tokens, 48, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x)
        got = ours(x.float().to(device))
    torch.testing.assert_close(got.double().cpu(), expected, atol=2e-5, rtol=1e-4)
