"""The feed-forward of diffusion transformer blocks, with diffusers ``FeedForward``'s
parameter names (``net.0.proj``, ``net.2``): GEGLU (SD1.5 UNets) or GELU (DiT, SD3).

GEGLU here is plain PyTorch (projection, chunk, ``h * gelu(gate)``); a fused GEGLU op
belongs to ``mmfast.ops.activation`` and can replace it there.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, x):
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class GELU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(self.proj(x), approximate=self.approximate)


ACTIVATIONS = {
    "geglu": lambda i, o, bias: GEGLU(i, o, bias),
    "gelu": lambda i, o, bias: GELU(i, o, "none", bias),
    "gelu-approximate": lambda i, o, bias: GELU(i, o, "tanh", bias),
}


class FeedForward(nn.Module):
    """``net``: [activation with its input projection, dropout, output projection]."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0,
                 activation_fn: str = "geglu", inner_dim: int | None = None, bias: bool = True):
        super().__init__()
        if activation_fn not in ACTIVATIONS:
            raise ValueError(f"activation_fn: expected one of {', '.join(ACTIVATIONS)}, got {activation_fn!r}")
        inner = inner_dim or dim * mult
        self.net = nn.ModuleList([ACTIVATIONS[activation_fn](dim, inner, bias), nn.Dropout(dropout),
                                  nn.Linear(inner, dim_out or dim, bias=bias)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x
