"""Feed-forward blocks of vision transformers with the activation as one fused pass,
named like Hugging Face's so their weights load directly:

    MLP        fc2(act(fc1(x)))                         CLIPMLP, SiglipMLP, Qwen2-VL VisionMlp
    LinearFcMLP  linear_fc2(act(linear_fc1(x)))         Qwen3-VL's vision MLP (GELU-tanh)
    SwiGLUMLP  down_proj(silu(gate_proj(x)) * up_proj(x))   Qwen2.5-VL's vision MLP

The GEMMs are torch's (cuBLAS); the activation, and for SwiGLU the product with the up
projection, is one elementwise pass forward and one backward (mmfast.ops.activation).
"""

from torch import nn

from mmfast.nn.activation import activation_module
from mmfast.ops.activation import swiglu


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``; ``hidden_act`` is a Hugging Face name (``"gelu"``,
    ``"gelu_pytorch_tanh"``, ``"quick_gelu"``, ...)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "gelu",
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.act = activation_module(hidden_act)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LinearFcMLP(nn.Module):
    """:class:`MLP` under Qwen3-VL's names: ``linear_fc1``, ``act_fn``, ``linear_fc2``."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "gelu_pytorch_tanh",
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.linear_fc1 = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.act_fn = activation_module(hidden_act)
        self.linear_fc2 = nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)

    def forward(self, x):
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))


class SwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, the gate and product in one pass."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
