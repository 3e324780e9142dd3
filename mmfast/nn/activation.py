"""Activation modules on mmfast.ops.activation, and the Hugging Face ``hidden_act``
names they stand for."""

from torch import nn

from mmfast.ops.activation import gelu, quick_gelu


class GELU(nn.Module):
    """``torch.nn.GELU``: exact (erf) or ``approximate="tanh"``."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        return gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class QuickGELU(nn.Module):
    """CLIP's ``x * sigmoid(1.702 x)``."""

    def forward(self, x):
        return quick_gelu(x)


# transformers' ACT2FN names -> the mmfast module computing the same function.
# gelu_new / gelu_fast / gelu_pytorch_tanh are all the tanh approximation.
_HF_ACTIVATIONS = {
    "gelu": lambda: GELU("none"),
    "gelu_pytorch_tanh": lambda: GELU("tanh"),
    "gelu_new": lambda: GELU("tanh"),
    "gelu_fast": lambda: GELU("tanh"),
    "quick_gelu": QuickGELU,
}


def activation_module(hidden_act: str) -> nn.Module:
    """The mmfast module for a Hugging Face ``hidden_act`` name."""
    if hidden_act not in _HF_ACTIVATIONS:
        raise ValueError(f"hidden_act: mmfast has no fused activation for {hidden_act!r} "
                         f"(supported: {', '.join(_HF_ACTIVATIONS)})")
    return _HF_ACTIVATIONS[hidden_act]()
