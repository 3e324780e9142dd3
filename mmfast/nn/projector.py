"""LLaVA's multimodal projector: linear -> GELU -> linear, state_dict-compatible with
Hugging Face's LlavaMultiModalProjector (``linear_1``, ``linear_2``)."""

import torch.nn.functional as F
from torch import nn

from mmfast.ops.activation import gelu, quick_gelu

# Hugging Face activation names -> the function (``gelu`` is the exact erf form). The GELUs
# are mmfast's one-pass kernels (forward and backward).
ACTIVATIONS = {
    "gelu": gelu,
    "gelu_pytorch_tanh": lambda x: gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"act: expected one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class MLPProjector(nn.Module):
    """``linear_2(act(linear_1(x)))``: two GEMMs with their bias epilogues, and the
    activation in one elementwise pass between them (not yet fused into the GEMM)."""

    def __init__(self, in_features: int, out_features: int, act: str = "gelu", bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.act_fn = activation(act)
        factory = {"device": device, "dtype": dtype}
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias, **factory)
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias, **factory)
        self.act = act

    @classmethod
    def from_config(cls, config) -> "MLPProjector":
        """From a Hugging Face LlavaConfig."""
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        return cls(config.vision_config.hidden_size * layers, config.text_config.hidden_size,
                   config.projector_hidden_act, config.multimodal_projector_bias)

    def forward(self, x):
        return self.linear_2(self.act_fn(self.linear_1(x)))

    def extra_repr(self) -> str:
        return f"act={self.act}"
