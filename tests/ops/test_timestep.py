"""Sinusoidal timestep embedding against diffusers' get_timestep_embedding."""

import pytest
import torch

import mmfast

diffusers_embeddings = pytest.importorskip("diffusers.models.embeddings")


@pytest.mark.parametrize("kwargs", [
    {"embedding_dim": 320, "flip_sin_to_cos": True, "downscale_freq_shift": 0},  # SD1.5
    {"embedding_dim": 256, "flip_sin_to_cos": True, "downscale_freq_shift": 1},  # SD3 / DiT
    {"embedding_dim": 33, "flip_sin_to_cos": False, "downscale_freq_shift": 1, "scale": 1000.0,
     "max_period": 500},  # odd width: padded
])
def test_matches_diffusers(kwargs, device):
    t = torch.tensor([0.0, 1.0, 0.5, 999.0, 261.25], device=device)
    expected = diffusers_embeddings.get_timestep_embedding(t, **kwargs)
    args = dict(kwargs)
    dim = args.pop("embedding_dim")
    got = mmfast.ops.timestep_embedding(t, dim, **args)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_integer_timesteps(device):
    t = torch.tensor([3, 700], device=device)
    torch.testing.assert_close(mmfast.ops.timestep_embedding(t, 16),
                               diffusers_embeddings.get_timestep_embedding(t, 16), rtol=0, atol=0)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(2, 1), 8), r"timesteps: expected a 1-d tensor"),
    ((torch.zeros(2), 1), "dim: expected an int >= 2"),
    ((torch.zeros(2), 8, False, 4), "downscale_freq_shift: 4 equals dim // 2"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        mmfast.ops.timestep_embedding(*args)
