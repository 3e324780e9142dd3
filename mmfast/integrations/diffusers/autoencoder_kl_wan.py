"""diffusers ``AutoencoderKLWan`` (Wan 2.1 / 2.2 causal 3D-convolution video VAE): every
``WanRMS_norm`` and the SiLU after it run as one ``channel_rms_norm`` pass (residual
blocks' two norms, the encoder's and decoder's ``norm_out``; the SiLU module becomes an
Identity while patched), the mid-block attention's norm likewise without the SiLU.
``encode`` refuses videos it would silently crop (a ValueError naming ``x``).

Left to diffusers: the causal convolutions and their temporal cache, the resampling,
the attention itself, tiling and slicing. A norm whose ``gamma`` has another dtype than
its input (diffusers then promotes the output) runs diffusers' own forward, SiLU included.
"""

from __future__ import annotations

import types

import torch.nn.functional as F
from torch import nn

from mmfast.integrations.patching import Family, Replacement
from mmfast.ops.channel_rms_norm import channel_rms_norm

# diffusers' AutoencoderKLWan._encode: the first frame, then chunks of 4 (hard-coded there).
ENCODE_FRAME_CHUNK = 4


def _fusable(norm) -> bool:
    return (type(norm).__name__ == "WanRMS_norm" and norm.channel_first
            and (isinstance(norm.bias, float) and norm.bias == 0.0
                 or isinstance(norm.bias, nn.Parameter) and norm.bias.shape == norm.gamma.shape))


def _norm(self, x, activation):
    if x.dim() != self.gamma.dim() + 1 or self.gamma.dtype != x.dtype:
        y = type(self).forward(self, x)
        return F.silu(y) if activation == "silu" else y
    bias = self.bias.reshape(-1) if isinstance(self.bias, nn.Parameter) else None
    return channel_rms_norm(x, self.gamma.reshape(-1), bias, activation)


def _norm_forward(self, x):
    return _norm(self, x, None)


def _norm_silu_forward(self, x):
    return _norm(self, x, "silu")


def _fuse_silu(module, handle, name: str, norms: tuple[str, ...]) -> None:
    """``module``'s norms and the ``nonlinearity`` (SiLU) applied after each, in one pass."""
    if not isinstance(getattr(module, "nonlinearity", None), nn.SiLU):
        return
    if not all(_fusable(getattr(module, n, None)) for n in norms):
        return
    for n in norms:
        handle.set_forward(getattr(module, n), _norm_silu_forward, "channel_rms_norm + SiLU", f"{name}.{n}")
    handle.set_attr(module, "nonlinearity", nn.Identity())


def patch_residual_block(module, handle, name: str) -> None:
    _fuse_silu(module, handle, name, ("norm1", "norm2"))


def patch_encoder_decoder(module, handle, name: str) -> None:
    _fuse_silu(module, handle, name, ("norm_out",))


def patch_attention_block(module, handle, name: str) -> None:
    if _fusable(module.norm):
        handle.set_forward(module.norm, _norm_forward, "channel_rms_norm", f"{name}.norm")


def _checked_encode(self, x):
    if x.dim() != 5:
        raise ValueError(f"x: expected a video [B, C, T, H, W], got shape {tuple(x.shape)}")
    frames, height, width = x.shape[2:]
    if frames < 1 or (frames - 1) % ENCODE_FRAME_CHUNK:
        raise ValueError(f"x: {frames} frames; AutoencoderKLWan encodes 1 + {ENCODE_FRAME_CHUNK}k frames (the first, "
                         f"then chunks of {ENCODE_FRAME_CHUNK}) and would drop the rest")
    spatial = self.config.scale_factor_spatial
    if height % spatial or width % spatial:
        raise ValueError(f"x: height {height} and width {width} must be multiples of {spatial} (the VAE's spatial "
                         "downsampling); other sizes decode to another size")
    return type(self)._encode(self, x)


def _prepare(vae, handle):
    handle.set_attr(vae, "_encode", types.MethodType(_checked_encode, vae))
    handle.replaced.append(("", "encode input checked (frames, height, width)"))
    return vae


FAMILY = Family(
    "diffusers-autoencoder-kl-wan",
    model_classes=("AutoencoderKLWan",),
    replacements=(
        Replacement(("WanResidualBlock",), patch_residual_block, "channel_rms_norm + SiLU"),
        Replacement(("WanEncoder3d", "WanDecoder3d"), patch_encoder_decoder, "channel_rms_norm + SiLU"),
        Replacement(("WanAttentionBlock",), patch_attention_block, "channel_rms_norm"),
    ),
    prepare=_prepare,
)
