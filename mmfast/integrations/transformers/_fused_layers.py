"""Replacements shared by several transformers families (CLIP, SigLIP, Qwen2-VL,
Qwen2.5-VL): modules whose forward becomes one mmfast fused op whatever model they sit in.

    LayerNorm                  mmfast layer_norm (over the last dim only)
    *RMSNorm                   mmfast rms_norm (``weight``, ``variance_epsilon``)
    fc1 -> act -> fc2 MLPs     the activation as one fused pass
"""

from __future__ import annotations

from torch import nn

from mmfast.nn.activation import activation_module
from mmfast.ops.norm import layer_norm, rms_norm


def _layer_norm_forward(self, x):
    return layer_norm(x, self.weight, self.bias, self.eps)


def patch_layer_norm(module, handle, name):
    if len(module.normalized_shape) == 1:  # mmfast normalises over the last dim only
        handle.set_forward(module, _layer_norm_forward, "mmfast layer_norm", name)


def _rms_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def patch_rms_norm(module, handle, name):
    handle.set_forward(module, _rms_norm_forward, "rms_norm", name)


# transformers' activation classes -> the hidden_act name of the function they compute.
# (Their python variants, ``use_gelu_python`` / ``use_gelu_tanh_python``, compute the same.)
_HF_ACTIVATION_CLASSES = {"GELUTanh": "gelu_pytorch_tanh", "GELUActivation": "gelu",
                          "QuickGELUActivation": "quick_gelu"}


def hf_activation_name(act) -> str | None:
    """The Hugging Face ``hidden_act`` name of an activation module mmfast fuses, or None
    (left unpatched) for any other; ``torch.nn.GELU`` names itself by ``approximate``."""
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(act.approximate)
    return _HF_ACTIVATION_CLASSES.get(type(act).__name__)


def patch_activation_mlp(module, handle, name, hidden_act: str):
    """An ``fc2(act(fc1(x)))`` MLP, ``hidden_act`` naming its activation as Hugging Face
    does (``"gelu"``, ``"quick_gelu"``, ...)."""
    act = activation_module(hidden_act)

    def forward(self, hidden_states):
        return self.fc2(act(self.fc1(hidden_states)))

    handle.set_forward(module, forward, f"fused {hidden_act}", name)
