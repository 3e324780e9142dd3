"""Vision modules against Hugging Face: CLIP and SigLIP towers loaded from the state_dict
of tiny random HF models, the Qwen2-VL / Qwen2.5-VL patch merger and patch embedding,
and the MLPs against their plain-torch definitions."""

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.testing import random_tensor

transformers = pytest.importorskip("transformers")

# Head dim 32 (hidden 64, 2 heads): the Triton attention backend takes it.
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8, num_channels=3)


def _hf_clip():
    config = transformers.CLIPVisionConfig(**TINY, hidden_act="quick_gelu")
    return transformers.CLIPVisionModel(config).eval()


def _hf_siglip():
    config = transformers.SiglipVisionConfig(**TINY, hidden_act="gelu_pytorch_tanh")
    return transformers.SiglipVisionModel(config).eval()


def _assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("make", [_hf_clip, _hf_siglip], ids=["clip", "siglip"])
def test_tower_loads_hf_weights_and_matches(make, tmp_path):
    hf = make()
    hf.save_pretrained(tmp_path)  # and back: what a user loads is a saved checkpoint
    hf = type(hf).from_pretrained(tmp_path).eval()
    tower = mmfast.nn.VisionTransformer.from_config(hf.config).eval()
    missing, unexpected = tower.load_state_dict(hf.state_dict(), strict=True)
    assert not missing and not unexpected
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = hf(pixel_values=pixels)
        got = tower(pixels)
        _assert_close(got.last_hidden_state, want.last_hidden_state)
        assert want.pooler_output is not None  # CLIP's class token, SigLIP's pooling head
        _assert_close(got.pooler_output, want.pooler_output)
        # Another image size: the interpolated position table, as Hugging Face's.
        pixels = torch.randn(1, 3, 24, 40)
        want = hf(pixel_values=pixels, interpolate_pos_encoding=True)
        got = tower(pixels, interpolate_pos_encoding=True)
        _assert_close(got.last_hidden_state, want.last_hidden_state)


@pytest.mark.parametrize("style", ["clip", "siglip"])
def test_packed_tower_equals_each_image_alone(style, device):
    # Two image sizes in one stream: varlen attention keeps them apart, no padding.
    tower = mmfast.nn.VisionTransformer(style=style, hidden_size=64, num_layers=1, num_heads=2,
                                        intermediate_size=48, image_size=16, patch_size=8,
                                        hidden_act="gelu_pytorch_tanh").to(device).eval()
    images = [random_tensor((3, 16, 24), torch.float32, device), random_tensor((3, 8, 16), torch.float32, device)]
    with torch.no_grad():
        packed = tower.forward_packed(images)
        alone = [tower(image[None], interpolate_pos_encoding=True) for image in images]
    _assert_close(packed.last_hidden_state, torch.cat([out.last_hidden_state[0] for out in alone]))
    _assert_close(packed.pooler_output, torch.cat([out.pooler_output for out in alone]))
    assert packed.cu_seqlens.tolist() == ([0, 7, 10] if style == "clip" else [0, 6, 8])


def test_block_forward_is_the_chained_residual_form(device):
    block = mmfast.nn.VisionBlock(64, 2, 96, "gelu").to(device)
    x = random_tensor((2, 5, 64), torch.float32, device)
    with torch.no_grad():
        h = x + block.self_attn(block.layer_norm1(x))
        want = h + block.mlp(block.layer_norm2(h))
        _assert_close(block(x), want)
        residual, delta = block.forward_residual(x - 1.0, torch.ones_like(x))
        _assert_close(residual + delta, want)


def test_tower_trains(device):
    # Gradients reach every parameter (position table through the interpolation too).
    tower = mmfast.nn.VisionTransformer(style="clip", hidden_size=64, num_layers=1, num_heads=2,
                                        intermediate_size=32, image_size=16, patch_size=8).to(device)
    out = tower(torch.randn(2, 3, 24, 16, device=device), interpolate_pos_encoding=True)
    (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
    for name, p in tower.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_position_cache_reuses_and_refreshes():
    embed = mmfast.nn.PatchEmbed(16, image_size=16, patch_size=8, class_token=True)
    with torch.no_grad():
        first = embed(torch.randn(1, 3, 24, 24), interpolate_pos_encoding=True)
        table = embed._pos_cache.get(embed.position_embedding.weight, (3, 3), True)
        assert embed._pos_cache.get(embed.position_embedding.weight, (3, 3), True) is table
        embed.position_embedding.weight.add_(1.0)  # new weights: a new table
        assert embed._pos_cache.get(embed.position_embedding.weight, (3, 3), True) is not table
    assert first.shape == (1, 10, 16)


def test_packed_embedding_equals_per_image():
    embed = mmfast.nn.PatchEmbed(32, image_size=16, patch_size=8, class_token=True)
    images = [torch.randn(3, 16, 24), torch.randn(3, 8, 8)]
    with torch.no_grad():
        tokens, cu = embed.forward_packed(images)
        each = [embed(image[None], interpolate_pos_encoding=True)[0] for image in images]
    _assert_close(tokens, torch.cat(each))
    assert cu.tolist() == [0, 7, 9]


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_patch_merger_matches_hugging_face(norm):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger as Qwen2VLPatchMerger

    hf = (Qwen2_5_VLPatchMerger if norm == "rms" else Qwen2VLPatchMerger)(dim=48, context_dim=32)
    with torch.no_grad():
        for p in hf.parameters():  # norm weights away from their all-ones init
            p.add_(torch.randn_like(p) * 0.1)
    ours = mmfast.nn.PatchMerger(dim=48, context_dim=32, norm=norm)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(4 * 5, 32)
    _assert_close(ours(x), hf(x))
    with pytest.raises(ValueError, match="x: 18 tokens"):
        ours(torch.randn(18, 32))


def test_patch_embed_3d_matches_hugging_face():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

    hf = Qwen2_5_VisionPatchEmbed(patch_size=4, temporal_patch_size=2, in_channels=3, embed_dim=40)
    ours = mmfast.nn.PatchEmbed3d(patch_size=4, temporal_patch_size=2, in_channels=3, embed_dim=40)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2 * 2 * 3, 3 * 2 * 4 * 4)
    _assert_close(ours(x, grid_thw=torch.tensor([[2, 2, 3]])), hf(x))
    with pytest.raises(ValueError, match="grid_thw: its patches sum to 6"):
        ours(x, grid_thw=torch.tensor([[1, 2, 3]]))


def test_mlps_match_their_definition(device):
    mlp = mmfast.nn.MLP(24, 40, "quick_gelu").to(device)
    swi = mmfast.nn.SwiGLUMLP(24, 40).to(device)
    x = random_tensor((3, 5, 24), torch.float32, device)
    h = mlp.fc1(x)
    _assert_close(mlp(x), mlp.fc2(h * torch.sigmoid(1.702 * h)))
    _assert_close(swi(x), swi.down_proj(F.silu(swi.gate_proj(x)) * swi.up_proj(x)))
    with pytest.raises(ValueError, match="hidden_act: mmfast has no fused activation for 'relu'"):
        mmfast.nn.MLP(8, 8, "relu")
