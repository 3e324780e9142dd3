"""The per-module replacements the diffusers families share. Each takes (module, handle,
qualified name), checks that the instance is of a configuration mmfast covers, and
patches it through the handle (reversibly) or leaves it as it is."""

from __future__ import annotations

from torch import nn

from mmfast.integrations.diffusers.attention_processors import patch_attention
from mmfast.nn import adaptive_norm, dit, feed_forward, resnet, spatial_attention, transformer_2d
from mmfast.ops.group_norm import group_norm
from mmfast.ops.norm import rms_norm


def _group_norm_forward(self, x):
    return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def patch_group_norm(module, handle, name: str) -> None:
    """A free-standing GroupNorm (Transformer2DModel's input norm, conv_norm_out): one
    pass in either memory format. Those inside patched ResNet blocks are bypassed anyway."""
    handle.set_forward(module, _group_norm_forward, "GroupNorm", name)


def _group_norm_silu_forward(self, x):
    return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, "silu")


def patch_norm_out_silu(module, handle, name: str) -> None:
    """A VAE Encoder / Decoder: its ``conv_norm_out`` GroupNorm and the ``conv_act`` SiLU
    after it in one pass (the SiLU becomes an Identity while patched)."""
    norm, act = getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)
    if type(norm) is nn.GroupNorm and norm.affine and isinstance(act, nn.SiLU):
        handle.set_forward(norm, _group_norm_silu_forward, "GroupNorm+SiLU fused (conv_act now Identity)",
                           f"{name}.conv_norm_out")
        handle.set_attr(module, "conv_act", nn.Identity())


def patch_spatial_attention(module, handle, name: str) -> None:
    """A VAE's mid-block attention: GroupNorm on the 4-D map and mmfast attention, no
    layout round trip; other Attention modules get the mmfast processor."""
    if spatial_attention.fusable(module) and type(getattr(module, "processor", None)).__name__ == "AttnProcessor2_0":
        handle.set_forward(module, spatial_attention.spatial_attention_forward,
                           "spatial self-attention (GroupNorm on the map, mmfast attention)", name)
    else:
        patch_attention(module, handle, name)


def patch_resnet(module, handle, name: str) -> None:
    if resnet.fusable(module):
        handle.set_forward(module, resnet.resnet_block_forward, "GroupNorm+SiLU fused", name)


def patch_basic_transformer_block(module, handle, name: str) -> None:
    if transformer_2d.fusable(module):
        handle.set_forward(module, transformer_2d.transformer_2d_block_forward,
                           "residual adds fused into LayerNorms", name)
    elif dit.dit_fusable(module):
        handle.set_forward(module, dit.dit_block_forward, "adaLN-Zero block (fused modulation, gated residuals)",
                           name)


def patch_joint_block(module, handle, name: str) -> None:
    if dit.mmdit_fusable(module):
        handle.set_forward(module, dit.mmdit_block_forward, "MM-DiT block (fused modulation, gated residuals)", name)


def patch_ada_layer_norm_zero(module, handle, name: str) -> None:
    if adaptive_norm.modulation_fusable(module):
        handle.set_forward(module, adaptive_norm.ada_layer_norm_zero_forward, "adaln_modulate", name)


def patch_sd35_ada_layer_norm_zero_x(module, handle, name: str) -> None:
    if adaptive_norm.modulation_fusable(module):
        handle.set_forward(module, adaptive_norm.sd35_ada_layer_norm_zero_x_forward, "adaln_modulate x2", name)


def _rms_norm_forward(self, hidden_states):
    if self.weight is not None and self.weight.dtype != hidden_states.dtype:
        return type(self).forward(self, hidden_states)  # diffusers' own mixed-dtype rule
    return rms_norm(hidden_states, self.weight, self.eps)


def patch_rms_norm(module, handle, name: str) -> None:
    """diffusers' RMSNorm (SD3.5's per-head q/k norms), with or without weight, no bias."""
    if getattr(module, "bias", None) is None:
        handle.set_forward(module, _rms_norm_forward, "rms_norm", name)


def patch_ada_layer_norm_continuous(module, handle, name: str) -> None:
    if adaptive_norm.modulation_fusable(module):
        handle.set_forward(module, adaptive_norm.ada_layer_norm_continuous_forward, "adaln_modulate", name)


def patch_geglu(module, handle, name: str) -> None:
    if type(module.proj).__name__ == "Linear":
        handle.set_forward(module, feed_forward.geglu_forward, "GEGLU in one pass", name)


def patch_gelu(module, handle, name: str) -> None:
    """diffusers' GELU (projection then activation); torch's nn.GELU (no ``proj``, as in
    PixArtAlphaTextProjection) is left as it is."""
    if type(getattr(module, "proj", None)).__name__ == "Linear" and module.approximate in ("none", "tanh"):
        handle.set_forward(module, feed_forward.gelu_forward, "GELU in one pass", name)


__all__ = ["patch_ada_layer_norm_continuous", "patch_ada_layer_norm_zero", "patch_attention",
           "patch_basic_transformer_block", "patch_geglu", "patch_gelu", "patch_group_norm",
           "patch_joint_block", "patch_norm_out_silu", "patch_resnet", "patch_rms_norm",
           "patch_sd35_ada_layer_norm_zero_x", "patch_spatial_attention"]
