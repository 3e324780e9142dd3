"""mmfast.nn.Qwen3VisionTransformer and its parts against Hugging Face's Qwen3VLVisionModel:
the Triton kernels (under the interpreter on a CPU) at the released head dim 72, in
float32 and float16, within the project's error rule; the merger's fused residual; bad
configurations."""

import copy

import pytest
import torch

import mmfast
from mmfast.nn import Qwen3PatchMerger, Qwen3VisionTransformer

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")

# Head dim 72 as in Qwen3-VL-8B (2 heads of 72), a 4x4 position grid, DeepStack after block 0.
CONFIG = {"depth": 2, "hidden_size": 144, "num_heads": 2, "intermediate_size": 96, "out_hidden_size": 64,
          "patch_size": 4, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}
GRID = torch.tensor([[1, 4, 6], [2, 4, 4]])  # an image stretched from the 4x4 grid, and a 2-patch video


def _hf_tower():
    config = transformers.Qwen3VLConfig(vision_config=CONFIG).vision_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return modeling.Qwen3VLVisionModel._from_config(config).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels_at_head_dim_72_within_twice_the_reference_error(dtype):
    hf = _hf_tower()
    ours = Qwen3VisionTransformer.from_config(hf.config)
    ours.load_state_dict(hf.state_dict())
    assert ours.head_dim == 72
    pixels = torch.randn(int(GRID.prod(-1).sum()), 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = copy.deepcopy(hf).double()(pixels.double(), grid_thw=GRID)
        exact = [out.pooler_output, *out.deepstack_features]
        out = hf.to(dtype)(pixels.to(dtype), grid_thw=GRID)
        want = [out.pooler_output, *out.deepstack_features]
        with mmfast.set_backend("triton"):
            out = ours.to(dtype)(pixels.to(dtype), GRID)
        got = [out.merged, *out.deepstack]
    for g, w, e in zip(got, want, exact):
        err, err_hf = (g.double() - e).abs().max(), (w.double() - e).abs().max()
        assert err <= 2 * err_hf + 1e-5 * e.abs().max(), (err.item(), err_hf.item())


def test_merger_matches_hugging_face_and_fuses_the_residual():
    config = transformers.Qwen3VLConfig(vision_config=CONFIG).vision_config
    x, residual = torch.randn(16, 144), torch.randn(16, 144)
    for post in (False, True):
        torch.manual_seed(0)
        hf = modeling.Qwen3VLVisionPatchMerger(config, use_postshuffle_norm=post)
        ours = Qwen3PatchMerger(64, 144, 2, postshuffle_norm=post)
        ours.load_state_dict(hf.state_dict())
        with torch.no_grad(), mmfast.set_backend("torch"):
            torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)
            if not post:
                merged, stream = ours(x, residual)
                torch.testing.assert_close(merged, hf(x + residual), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(stream, x + residual, rtol=0, atol=0)
    with pytest.raises(ValueError, match="residual"):
        Qwen3PatchMerger(64, 144, 2, postshuffle_norm=True)(x, residual)
    with pytest.raises(ValueError, match="do not group"):
        Qwen3PatchMerger(64, 144, 2)(torch.randn(3, 144))


def test_bad_configuration():
    with pytest.raises(ValueError, match="num_position_embeddings: expected a square"):
        Qwen3VisionTransformer(**{**CONFIG, "num_position_embeddings": 15})
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        Qwen3VisionTransformer(**{**CONFIG, "deepstack_visual_indexes": [2]})
    with pytest.raises(ValueError, match="head dim"):
        Qwen3VisionTransformer(**{**CONFIG, "num_heads": 5})
