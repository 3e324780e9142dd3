"""SD1.5-family ``UNet2DConditionModel`` assembled with mmfast blocks.

:func:`unet2d_condition_model` builds diffusers' UNet from its config (diffusers does the
wiring: time embedding, down/mid/up blocks, skip connections, conv in/out) and puts
mmfast modules in place of its hot blocks:

- every ``ResnetBlock2D`` without in-block up/down-sampling -> :class:`ResnetBlock2D`
  (GroupNorm+SiLU fused, both memory formats);
- every ``BasicTransformerBlock`` of the LayerNorm kind -> :class:`Transformer2DBlock`
  (mmfast attention, residual adds fused into the LayerNorms).

Parameter names are unchanged, so a diffusers UNet's state_dict loads as it is. What
stays diffusers' own: the time embedding MLP, ``Transformer2DModel``'s GroupNorm and
projections around the blocks, the down/up-sampling convolutions and the output
convolution; ``conv_norm_out`` and its SiLU become one fused GroupNorm+SiLU pass.
Needs diffusers (imported on call).
"""

from __future__ import annotations

from torch import nn

from mmfast.nn import resnet, transformer_2d
from mmfast.nn._swap import swap_modules
from mmfast.nn.group_norm import fuse_norm_out_silu


def _activation_name(act: nn.Module) -> str | None:
    name = type(act).__name__
    if name == "GEGLU":
        return "geglu"
    if name == "GELU":
        return "gelu-approximate" if act.approximate == "tanh" else "gelu"
    return None


def _transformer_block_from(block) -> nn.Module | None:
    activation = _activation_name(block.ff.net[0])
    if activation is None or len(block.ff.net) != 3:
        return None
    attn1, attn2, norm1 = block.attn1, block.attn2, block.norm1
    return transformer_2d.Transformer2DBlock(
        dim=norm1.normalized_shape[0], num_attention_heads=attn1.heads,
        attention_head_dim=attn1.inner_dim // attn1.heads, dropout=block.dropout,
        cross_attention_dim=attn2.cross_attention_dim if attn2 is not None else None,
        activation_fn=activation, attention_bias=attn1.to_q.bias is not None,
        only_cross_attention=block.only_cross_attention, norm_elementwise_affine=norm1.elementwise_affine,
        norm_eps=norm1.eps, attention_out_bias=attn1.to_out[0].bias is not None,
        ff_inner_dim=block.ff.net[2].in_features, ff_bias=block.ff.net[2].bias is not None,
    )


def _replacement(module: nn.Module) -> nn.Module | None:
    name = type(module).__name__
    if isinstance(module, (resnet.ResnetBlock2D, transformer_2d.Transformer2DBlock)):
        return None  # already mmfast's
    if name == "ResnetBlock2D" and resnet.fusable(module) and module.upsample is None and module.downsample is None:
        return resnet.ResnetBlock2D.like(module)
    if name == "BasicTransformerBlock" and transformer_2d.fusable(module):
        return _transformer_block_from(module)
    return None


def use_mmfast_blocks(model: nn.Module) -> list[str]:
    """Replace, in place, the diffusers blocks of ``model`` that mmfast has modules for,
    keeping their weights and names, and fuse ``conv_norm_out`` with its SiLU; returns the
    qualified names replaced. Calling it again replaces nothing."""
    return swap_modules(model, _replacement) + fuse_norm_out_silu(model)


def unet2d_condition_model(config) -> nn.Module:
    """A diffusers ``UNet2DConditionModel`` built from ``config`` (a dict or FrozenDict, as
    ``unet.config``) with mmfast blocks in it; load a diffusers state_dict into it as is."""
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_config(config)
    use_mmfast_blocks(model)
    return model


__all__ = ["unet2d_condition_model", "use_mmfast_blocks"]
