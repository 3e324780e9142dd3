"""Sinusoidal timestep embedding, as diffusers' ``get_timestep_embedding``.

For timesteps t: [N] (any dtype; fractional steps allowed) and an embedding of
``dim`` channels, half = dim // 2 frequencies

    f_i = exp(-ln(max_period) * i / (half - downscale_freq_shift)),   i = 0 .. half - 1
    emb = [sin(scale * t f), cos(scale * t f)]        ([cos, sin] with flip_sin_to_cos)

zero-padded by one channel when ``dim`` is odd; float32 [N, dim]. PyTorch only: the
tensor is a few kilobytes, one fused elementwise op would save microseconds once per
denoiser call, and this way torch.compile fuses it with the MLP that follows.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor


def timestep_embedding(timesteps, dim, flip_sin_to_cos=False, downscale_freq_shift=1.0, scale=1.0,
                       max_period=10000) -> Tensor:
    """Sinusoidal embedding of ``timesteps`` [N]: float32 [N, dim].

    Example::

        >>> mmfast.ops.timestep_embedding(torch.tensor([0, 500, 999]), 320,
        ...                               flip_sin_to_cos=True, downscale_freq_shift=0).shape
        torch.Size([3, 320])
    """
    if not isinstance(timesteps, Tensor):
        raise TypeError(f"timesteps: expected a Tensor, got {type(timesteps).__name__}")
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps: expected a 1-d tensor [N], got shape {tuple(timesteps.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim: expected an int >= 2, got {dim!r}")
    half = dim // 2
    if half == downscale_freq_shift:
        raise ValueError(f"downscale_freq_shift: {downscale_freq_shift} equals dim // 2, a division by zero")
    for name, value in (("downscale_freq_shift", downscale_freq_shift), ("scale", scale),
                        ("max_period", max_period)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if max_period <= 0:
        raise ValueError(f"max_period: expected a number > 0, got {max_period!r}")

    index = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    # The same order of operations as diffusers, so the embeddings agree to the bit.
    freqs = torch.exp(-math.log(max_period) * index / (half - downscale_freq_shift))
    angles = scale * (timesteps[:, None].float() * freqs[None, :])
    parts = (angles.cos(), angles.sin()) if flip_sin_to_cos else (angles.sin(), angles.cos())
    emb = torch.cat(parts, dim=-1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb
