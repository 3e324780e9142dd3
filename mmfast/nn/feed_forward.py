"""The feed-forward of diffusion transformer blocks, with diffusers ``FeedForward``'s
parameter names (``net.0.proj``, ``net.2``): GEGLU (SD1.5 UNets) or GELU (DiT, SD3).

The activations run on ``mmfast.ops.activation``: GEGLU as one pass over the projection's
[..., 2N] output (diffusers' order: value half first, gate half second), no chunk copies.
``geglu_forward`` / ``gelu_forward`` also run, through ``mmfast.patch``, on diffusers'
``GEGLU`` / ``GELU`` modules (same attribute names).
"""

from __future__ import annotations

from torch import nn

from mmfast.ops.activation import geglu, gelu


def geglu_forward(self, hidden_states, *args, **kwargs):
    """diffusers GEGLU.forward: ``h * gelu(gate)`` for ``h, gate = proj(x).chunk(2, -1)``."""
    return geglu(self.proj(hidden_states), gate_first=False)


def gelu_forward(self, hidden_states):
    """diffusers GELU.forward: ``gelu(proj(x))``, exact or tanh-approximate."""
    return gelu(self.proj(hidden_states), approximate=self.approximate)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    forward = geglu_forward


class GELU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    forward = gelu_forward


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
