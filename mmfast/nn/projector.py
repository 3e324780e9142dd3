"""LLaVA's multimodal projector: linear -> GELU -> linear, state_dict-compatible with
Hugging Face's LlavaMultiModalProjector (``linear_1``, ``linear_2``)."""

import torch.nn.functional as F
from torch import nn

# Hugging Face activation names -> the function (``gelu`` is the exact erf form).
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * (1.702 * x).sigmoid(),
    "silu": F.silu,
    "relu": F.relu,
}


class MLPProjector(nn.Module):
    """``linear_2(act(linear_1(x)))``: two cuBLAS GEMMs with bias epilogues and the
    activation between them (no fused Triton kernel yet)."""

    def __init__(self, in_features: int, out_features: int, act: str = "gelu", bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"act: expected one of {', '.join(_ACTIVATIONS)}, got {act!r}")
        factory = {"device": device, "dtype": dtype}
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias, **factory)
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias, **factory)
        self.act = act

    def forward(self, x):
        return self.linear_2(_ACTIVATIONS[self.act](self.linear_1(x)))

    def extra_repr(self) -> str:
        return f"act={self.act}"
