"""ResnetBlock2D of diffusion UNets with GroupNorm+SiLU fused (``mmfast.ops.group_norm``).

``resnet_block_forward`` is diffusers' ``ResnetBlock2D.forward`` with each GroupNorm and
the SiLU after it done in one pass; it runs on this module or, through ``mmfast.patch``,
on a diffusers ``ResnetBlock2D`` instance (same attribute names). Both memory formats
pass through unchanged: a channels_last UNet stays channels_last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.ops.group_norm import group_norm


def _norm_silu(norm: nn.GroupNorm, x: Tensor, silu: bool) -> Tensor:
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, "silu" if silu else None)


def fusable(block) -> bool:
    """Whether a diffusers ResnetBlock2D has the shape resnet_block_forward handles: SiLU,
    affine GroupNorms, no FIR/up/down sampling kernels, default or scale_shift temb, or
    none at all (a VAE decoder's blocks say "group": no time embedding, temb ignored)."""
    return (isinstance(block.nonlinearity, nn.SiLU)
            and all(isinstance(n, nn.GroupNorm) and n.affine for n in (block.norm1, block.norm2))
            and (block.time_embedding_norm in ("default", "scale_shift")
                 or (block.time_embedding_norm == "group" and block.time_emb_proj is None)))


def resnet_block_forward(self, input_tensor: Tensor, temb: Tensor | None, *args, **kwargs) -> Tensor:
    """diffusers ResnetBlock2D.forward with fused GroupNorm+SiLU (see :func:`fusable`)."""
    hidden = _norm_silu(self.norm1, input_tensor, silu=True)
    if self.upsample is not None:
        input_tensor, hidden = self.upsample(input_tensor), self.upsample(hidden)
    elif self.downsample is not None:
        input_tensor, hidden = self.downsample(input_tensor), self.downsample(hidden)
    hidden = self.conv1(hidden)

    if self.time_emb_proj is not None and temb is not None:
        if not self.skip_time_act:
            temb = F.silu(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError("temb: required when time_embedding_norm is 'scale_shift'")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden = F.silu(_norm_silu(self.norm2, hidden, silu=False) * (1 + time_scale) + time_shift)
    else:
        if temb is not None and self.time_embedding_norm == "default":
            hidden = hidden + temb
        hidden = _norm_silu(self.norm2, hidden, silu=True)

    hidden = self.conv2(self.dropout(hidden))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden) / self.output_scale_factor


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (state_dict compatible) for the SD1.5 UNet family:
    SiLU, GroupNorm, "default" or "scale_shift" time embedding, optional 1x1 shortcut.
    Up/down-sampling inside the block (``up=True``/``down=True``) is not covered."""

    def __init__(self, *, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 temb_channels: int | None = 512, groups: int = 32, groups_out: int | None = None,
                 eps: float = 1e-6, time_embedding_norm: str = "default", output_scale_factor: float = 1.0,
                 use_in_shortcut: bool | None = None, conv_shortcut_bias: bool = True,
                 skip_time_act: bool = False, conv_2d_out_channels: int | None = None):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"time_embedding_norm: expected 'default' or 'scale_shift', got {time_embedding_norm!r}")
        out_channels = out_channels or in_channels
        conv_out = conv_2d_out_channels or out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.skip_time_act = skip_time_act
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = None
        if temb_channels is not None:
            width = out_channels * (2 if time_embedding_norm == "scale_shift" else 1)
            self.time_emb_proj = nn.Linear(temb_channels, width)
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, conv_out, kernel_size=3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.upsample = self.downsample = None
        use_shortcut = in_channels != conv_out if use_in_shortcut is None else use_in_shortcut
        self.conv_shortcut = (nn.Conv2d(in_channels, conv_out, kernel_size=1, bias=conv_shortcut_bias)
                              if use_shortcut else None)

    forward = resnet_block_forward

    @classmethod
    def like(cls, block) -> "ResnetBlock2D":
        """A block with the configuration of diffusers ResnetBlock2D ``block`` (one that
        :func:`fusable` accepts and that has no up/down-sampling); weights not copied."""
        shortcut = block.conv_shortcut
        return cls(
            in_channels=block.in_channels, out_channels=block.out_channels, dropout=block.dropout.p,
            temb_channels=block.time_emb_proj.in_features if block.time_emb_proj is not None else None,
            groups=block.norm1.num_groups, groups_out=block.norm2.num_groups, eps=block.norm1.eps,
            # "group" (VAE decoder) has no time embedding: "default" with temb None is the same math
            time_embedding_norm="default" if block.time_embedding_norm == "group" else block.time_embedding_norm,
            output_scale_factor=block.output_scale_factor,
            use_in_shortcut=shortcut is not None,
            conv_shortcut_bias=shortcut is None or shortcut.bias is not None,
            skip_time_act=block.skip_time_act, conv_2d_out_channels=block.conv2.out_channels,
        )
