"""Qwen-VL's resampler: 256 learned queries (a 16 x 16 grid) cross-attend once to the
vision transformer's tokens, with a fixed 2-D sin-cos position embedding added to the
queries and to the keys (not the values); LayerNorms on both sides.

No transformers class exists (Qwen-VL ships it as remote code, ``visual.Resampler``); this
follows that description, with the same parameter names (``query``, ``pos_embed``,
``kv_proj``, ``attn`` as an nn.MultiheadAttention's ``in_proj_*``/``out_proj``, ``ln_q``,
``ln_kv``), so its checkpoints load:

    q = ln_q(query) + pos(Q)          k = ln_kv(kv_proj(x)) + pos(T)      v = ln_kv(kv_proj(x))
    out = out_proj(MHA(W_q q, W_k k, W_v v))

pos(n) is the grid embedding, resized bicubically to sqrt(n) x sqrt(n) when the image
gives another number of tokens. The embedding is MAE's: the first half of the channels
encodes the column, the second half the row, each as [sin, cos] of position * 10000^(-2i/d).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.ops.cross_attention import cross_attention
from mmfast.ops.cross_attention_masks import KeyPaddingMask


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M, dim]: [sin(p * w_i), cos(p * w_i)] with w_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.reshape(-1, 1).double() * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """[grid_size**2, dim] in row-major order: the column code, then the row code."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def resize_positions(pos: torch.Tensor, tokens: int) -> torch.Tensor:
    """The [n, C] grid embedding for ``tokens`` = s * s tokens (bicubic resize if s differs)."""
    src, dst = int(math.isqrt(pos.shape[0])), int(math.isqrt(tokens))
    if src == dst:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)


class QwenVLResampler(nn.Module):
    """``forward(x [B, T, kv_dim], key_valid=None [B, T] bool)`` -> [B, grid_size**2, C]."""

    def __init__(self, grid_size: int = 16, embed_dim: int = 4096, num_heads: int = 32,
                 kv_dim: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(grid_size**2, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid_size), requires_grad=False)
        if kv_dim is not None and kv_dim != embed_dim:
            self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        else:
            self.kv_proj = nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x, key_valid=None):
        batch, tokens, _ = x.shape
        kv = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query) + self.pos_embed
        k = kv + resize_positions(self.pos_embed, tokens)
        w_q, w_k, w_v = self.attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.attn.in_proj_bias.chunk(3)
        heads, dim = self.num_heads, q.shape[-1] // self.num_heads
        # The queries are the same for every image: project them once.
        q = F.linear(q, w_q, b_q).view(1, -1, heads, dim).expand(batch, -1, -1, -1)
        k = F.linear(k, w_k, b_k).view(batch, tokens, heads, dim)
        v = F.linear(kv, w_v, b_v).view(batch, tokens, heads, dim)
        mask = KeyPaddingMask(key_valid=key_valid) if key_valid is not None else None
        out = cross_attention(q, k, v, mask=mask).reshape(batch, q.shape[1], -1)
        return self.attn.out_proj(out)
