"""Norm modules whose state_dict matches torch.nn.LayerNorm and the RMSNorm of Hugging
Face models (LlamaRMSNorm, Qwen2RMSNorm: a single ``weight``)."""

import torch
from torch import nn

from mmfast.ops.norm import layer_norm, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dim. ``forward(x, residual=None)``: with a residual, returns
    ``(normed, x + residual)`` from one fused pass."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x, residual=None):
        return rms_norm(x, self.weight, self.eps, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.Module):
    """LayerNorm over the last dim. ``forward(x, residual=None)``: with a residual,
    returns ``(normed, x + residual)`` from one fused pass."""

    def __init__(
        self, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = True,
        bias: bool = True, device=None, dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(hidden_size, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(hidden_size, **factory)) if elementwise_affine and bias else None
        self.hidden_size = hidden_size
        self.eps = eps

    def forward(self, x, residual=None):
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, affine={self.weight is not None}"
