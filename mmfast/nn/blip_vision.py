"""The ViT of BLIP-2 (and BLIP, InstructBLIP) on mmfast ops, with the module names and
tensor shapes of Hugging Face's ``Blip2VisionModel``, so its state_dict loads as it is.

    embeddings      BlipVisionEmbeddings: ``class_embedding`` [1, 1, E], Conv2d
                    ``patch_embedding`` (with bias), ``position_embedding`` a bare
                    parameter [1, 1 + L, E]; one fused patch-embedding kernel
    encoder.layers  VisionBlock x depth (pre-LN), its attention the fused-``qkv`` layout:
                    ``qkv`` [3E, E] (q | k | v rows; bias [3E] or none) and ``projection``
    post_layernorm  on every token -> last_hidden_state; again on the class token -> pooler

Unlike CLIP there is no pre-encoder norm. The last block's residual add rides in
``post_layernorm``; the other adds in the next block's first norm (see VisionBlock).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from mmfast.nn.norm import LayerNorm
from mmfast.nn.patch_embed import PositionTableCache
from mmfast.nn.vision import Encoder, Packing, VisionBlock, VisionOutput
from mmfast.ops.attention import attention
from mmfast.ops.patch_embed import patch_embed


class QKVAttention(nn.Module):
    """Bidirectional multi-head self-attention over [B, T, E] with one ``qkv`` projection
    (Hugging Face's ``Blip2Attention``: its bias, when present, is one [3E] vector, the
    original q_bias | 0 | v_bias) and the output projection ``projection``."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide embed_dim {embed_dim}")
        factory = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **factory)
        self.projection = nn.Linear(embed_dim, embed_dim, **factory)

    def forward(self, x, packed: Packing | None = None):
        """``x`` [B, T, E]; or, with ``packed``, one stream [T, E] of several images."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        if packed is None:
            out = attention(q, k, v)
        else:
            out = attention(q, k, v, cu_seqlens_q=packed.cu_seqlens, cu_seqlens_k=packed.cu_seqlens,
                            max_seqlen_q=packed.max_seqlen, max_seqlen_k=packed.max_seqlen)
        return self.projection(out.flatten(-2))


class BlipVisionEmbeddings(nn.Module):
    """Patch GEMM + bias + class token + position table in one fused pass. Other image
    sizes need ``interpolate_pos_encoding=True`` (bicubic, as Hugging Face; cached)."""

    def __init__(self, embed_dim: int, image_size: int, patch_size: int, num_channels: int = 3,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.image_size, self.patch_size = image_size, patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, embed_dim, **factory))
        self.patch_embedding = nn.Conv2d(num_channels, embed_dim, patch_size, stride=patch_size, **factory)
        self.num_patches = (image_size // patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_patches + 1, embed_dim, **factory))
        self._pos_cache = PositionTableCache()

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False):
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values: expected [B, C, H, W], got shape {tuple(pixel_values.shape)}")
        conv, P = self.patch_embedding, self.patch_size
        H, W = pixel_values.shape[-2:]
        if not interpolate_pos_encoding and (H != self.image_size or W != self.image_size):
            raise ValueError(f"pixel_values: image size {H}x{W} does not match the model's "
                             f"{self.image_size}x{self.image_size}; pass interpolate_pos_encoding=True")
        pos = self.position_embedding[0]
        if interpolate_pos_encoding and H % P == 0 and W % P == 0:  # else patch_embed names the bad size
            pos = self._pos_cache.get(pos, (H // P, W // P), class_token=True)
        return patch_embed(pixel_values.to(conv.weight.dtype), conv.weight, conv.bias, pos,
                           self.class_embedding.view(-1))


class BlipVisionTransformer(nn.Module):
    """``forward(pixel_values, interpolate_pos_encoding=False)`` ->
    ``VisionOutput(last_hidden_state [B, 1 + L, E], pooler_output [B, E])`` as Hugging
    Face's ``Blip2VisionModel`` returns them. Defaults: BLIP-2's EVA ViT-g/14."""

    def __init__(self, *, hidden_size: int = 1408, num_layers: int = 39, num_heads: int = 16,
                 intermediate_size: int = 6144, image_size: int = 224, patch_size: int = 14,
                 num_channels: int = 3, hidden_act: str = "gelu", layer_norm_eps: float = 1e-6,
                 qkv_bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embeddings = BlipVisionEmbeddings(hidden_size, image_size, patch_size, num_channels, **factory)
        block = partial(VisionBlock, hidden_size, num_heads, intermediate_size, hidden_act, layer_norm_eps,
                        attention=partial(QKVAttention, bias=qkv_bias), **factory)
        self.encoder = Encoder([block() for _ in range(num_layers)])
        self.post_layernorm = LayerNorm(hidden_size, eps=layer_norm_eps, **factory)

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False) -> VisionOutput:
        residual, delta = self.embeddings(pixel_values, interpolate_pos_encoding), None
        for layer in self.encoder.layers:
            residual, delta = layer.forward_residual(residual, delta)
        hidden = self.post_layernorm(residual) if delta is None else self.post_layernorm(delta, residual=residual)[0]
        return VisionOutput(hidden, self.post_layernorm(hidden[:, 0]))
