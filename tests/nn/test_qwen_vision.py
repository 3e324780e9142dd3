"""mmfast's Qwen vision towers load Hugging Face's weights and give its outputs."""

import pytest
import torch

import mmfast
from mmfast.nn import Qwen2VisionTransformer, Qwen25VisionTransformer

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _sdpa_attention():
    # The Triton attention kernel is tested on its own (and through mmfast.nn.Attention);
    # under the interpreter it would take most of this file's time budget here.
    with mmfast.set_backend("sdpa", op="attention"):
        yield


# A video of 2 temporal patches with 6x10 patches per frame, and an image of 4x4 patches:
# with 2x2-unit windows, edge windows are cut short and the image's grid divides evenly.
GRID = torch.tensor([[2, 6, 10], [1, 4, 4]])


def _pixels(config):
    patches = int(GRID.prod(-1).sum())
    dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    return torch.randn(patches, dim)


def _hf_tower(model_class, config):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    module = modeling_qwen2_5_vl if hasattr(modeling_qwen2_5_vl, model_class) else modeling_qwen2_vl
    return getattr(module, model_class)._from_config(config).eval()


def _compare(hf, ours, config, window_order=None):
    ours.load_state_dict(hf.state_dict())  # strict: same names, same shapes
    pixels = _pixels(config)
    with torch.no_grad():
        want = hf(pixels, grid_thw=GRID)
        merged, hidden = ours(pixels, GRID, return_hidden_states=True)
    torch.testing.assert_close(merged, want.pooler_output, rtol=1e-5, atol=1e-5)
    want_hidden = want.last_hidden_state
    if window_order is not None:  # HF leaves the last hidden state in window order
        unit = config.spatial_merge_size ** 2
        want_hidden = want_hidden.view(-1, unit, want_hidden.shape[-1])[window_order].flatten(0, 1)
    torch.testing.assert_close(hidden, want_hidden, rtol=1e-5, atol=1e-5)


def test_qwen25_matches_hugging_face():
    config = transformers.Qwen2_5_VLConfig(vision_config={
        "depth": 3, "hidden_size": 64, "num_heads": 2, "intermediate_size": 96, "out_hidden_size": 48,
        "patch_size": 4, "window_size": 16, "fullatt_block_indexes": [1],
    }).vision_config
    hf = _hf_tower("Qwen2_5_VisionTransformerPretrainedModel", config)
    ours = Qwen25VisionTransformer.from_config(config)
    from mmfast.ops.vision_windows import qwen_vision_indices

    ix = qwen_vision_indices(GRID, spatial_merge_size=2, window_size=16, patch_size=4)
    assert ix.cu_window_seqlens.numel() - 1 > GRID[:, 0].sum()  # more than one window per frame
    _compare(hf, ours, config, window_order=ix.reverse_window_index)


def test_qwen2_matches_hugging_face():
    config = transformers.Qwen2VLConfig(vision_config={
        "depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 48, "patch_size": 4,
    }).vision_config
    _compare(_hf_tower("Qwen2VisionTransformerPretrainedModel", config), Qwen2VisionTransformer.from_config(config),
             config)


def test_backward_runs_and_bad_grid():
    tower = Qwen25VisionTransformer(depth=2, hidden_size=64, num_heads=2, intermediate_size=64, out_hidden_size=32,
                                    patch_size=4, window_size=16, fullatt_block_indexes=(1,))
    pixels = torch.randn(16, 3 * 2 * 4 * 4, requires_grad=True)
    tower(pixels, torch.tensor([[1, 4, 4]])).sum().backward()
    assert pixels.grad.isfinite().all() and tower.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="grid_thw: describes 32 patches"):
        tower(pixels, torch.tensor([[2, 4, 4]]))
