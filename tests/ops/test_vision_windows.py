"""Qwen vision index plumbing against Hugging Face's own functions, on random grids."""

import random

import pytest
import torch

from mmfast.ops.vision_windows import cache_clear, qwen_vision_indices, vision_rotary_cos_sin

vision_utils = pytest.importorskip("transformers.vision_utils")


def _random_grids(rng: random.Random, count: int) -> list[torch.Tensor]:
    grids = [
        torch.tensor([[1, 8, 8]]),                  # exactly one 4x4-unit window: HF pads a whole extra one
        torch.tensor([[1, 2, 2], [3, 16, 6]]),      # tiny image, video whose frames divide the window evenly
        torch.tensor([[1, 0, 4], [0, 4, 4], [2, 4, 6]]),  # empty entries among real ones
    ]
    for _ in range(count):
        n = rng.randint(1, 4)
        grids.append(torch.tensor([[rng.choice([1, 1, 2, 3]), 2 * rng.randint(1, 13), 2 * rng.randint(1, 13)]
                                   for _ in range(n)]))
    return grids


@pytest.mark.parametrize("merge,window,patch", [(2, 112, 14), (2, 56, 14), (1, 48, 16)])
def test_matches_hugging_face(merge, window, patch):
    rng = random.Random(merge * 1000 + window)
    for grid in _random_grids(rng, 12):
        ix = qwen_vision_indices(grid, spatial_merge_size=merge, window_size=window, patch_size=patch)
        want_index, want_cu = vision_utils.get_vision_window_index(grid, merge, window, patch)
        assert torch.equal(ix.window_index, want_index), grid.tolist()
        assert torch.equal(ix.cu_window_seqlens, want_cu), grid.tolist()
        assert ix.cu_window_seqlens.dtype == torch.int32 and ix.cu_seqlens.dtype == torch.int32
        assert torch.equal(ix.reverse_window_index, torch.argsort(want_index))
        assert ix.max_window_seqlen == int(want_cu.diff().max())

        want_seq = vision_utils.get_vision_cu_seqlens(grid)
        assert torch.equal(ix.cu_seqlens, want_seq)
        assert ix.max_seqlen == int(want_seq.diff().max())
        assert torch.equal(ix.position_ids, vision_utils.get_vision_position_ids(grid, merge))


@pytest.mark.parametrize("merge,side", [(2, 48), (2, 4), (1, 7)])
def test_position_grid_taps_equal_hugging_face_bit_for_bit(merge, side):
    """Qwen3-VL's bilinear resampling of its learned side x side position grid (48 x 48 in
    the released models): upsampled, downsampled, one-patch-wide and video grids."""
    rng = random.Random(merge * 100 + side)
    grids = _random_grids(rng, 10) + [torch.tensor([[1, 2 * merge, 120 * merge], [4, 60, 2]])]
    if merge == 1:
        grids.append(torch.tensor([[1, 1, 5], [2, 3, 1]]))  # a one-patch axis: no division by zero
    for grid in grids:
        ix = qwen_vision_indices(grid, spatial_merge_size=merge, position_grid_side=side)
        want_indices, want_weights = vision_utils.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=merge)
        assert torch.equal(ix.interp_indices, want_indices), grid.tolist()
        assert torch.equal(ix.interp_weights, want_weights), grid.tolist()
        assert ix.interp_weights.dtype == torch.float32
    assert qwen_vision_indices(torch.tensor([[1, 4, 4]])).interp_indices is None  # only when asked


def test_without_windows_the_frames_are_the_segments():
    grid = torch.tensor([[2, 4, 6], [1, 2, 2]])
    ix = qwen_vision_indices(grid, spatial_merge_size=2)
    assert torch.equal(ix.window_index, torch.arange(13))
    assert torch.equal(ix.cu_window_seqlens, ix.cu_seqlens)
    assert ix.cu_seqlens.tolist() == [0, 24, 48, 52] and ix.max_seqlen == 24
    empty = qwen_vision_indices(torch.zeros(0, 3, dtype=torch.int64), window_size=112)
    assert empty.cu_window_seqlens.tolist() == [0] and empty.window_index.numel() == 0


def test_cached_per_grid_values():
    cache_clear()
    a = qwen_vision_indices(torch.tensor([[1, 4, 6]]), window_size=112)
    b = qwen_vision_indices(torch.tensor([[1, 4, 6]], dtype=torch.int32), window_size=112)
    c = qwen_vision_indices(torch.tensor([[1, 6, 4]]), window_size=112)
    assert a is b and a is not c


def test_rotary_tables_match_hugging_face():
    modeling = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(vision_config={"hidden_size": 48, "num_heads": 2}).vision_config
    rotary = modeling.Qwen2_5_VLVisionRotaryEmbedding(config)
    position_ids = qwen_vision_indices(torch.tensor([[2, 6, 10]])).position_ids
    want_cos, want_sin = rotary(torch.empty(0), position_ids)
    cos, sin = vision_rotary_cos_sin(position_ids, head_dim=24)
    torch.testing.assert_close(torch.cat([cos, cos], -1), want_cos, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([sin, sin], -1), want_sin, rtol=0, atol=0)


def test_bad_input():
    with pytest.raises(TypeError, match="grid_thw"):
        qwen_vision_indices(torch.ones(1, 3))
    with pytest.raises(ValueError, match="grid_thw.*shape"):
        qwen_vision_indices(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        qwen_vision_indices(torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match=">= 0"):
        qwen_vision_indices(torch.tensor([[1, -2, 4]]))
    with pytest.raises(ValueError, match="window_size"):
        qwen_vision_indices(torch.tensor([[1, 2, 4]]), window_size=14)
    with pytest.raises(ValueError, match="position_grid_side"):
        qwen_vision_indices(torch.tensor([[1, 2, 4]]), position_grid_side=0)
    with pytest.raises(ValueError, match="head_dim"):
        vision_rotary_cos_sin(torch.zeros(3, 2), head_dim=10)
