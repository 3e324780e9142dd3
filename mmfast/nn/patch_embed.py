"""Patch-embedding modules named like Hugging Face's, on mmfast.ops.patch_embed.

    PatchEmbed     CLIPVisionEmbeddings / SiglipVisionEmbeddings: ``patch_embedding``
                   (Conv2d weights), ``position_embedding`` (Embedding), CLIP's
                   ``class_embedding``; [B, C, H, W] -> [B, L (+1), E]
    PatchEmbed3d   Qwen2-VL / Qwen2.5-VL ``PatchEmbed``: ``proj`` (Conv3d weights, no bias);
                   pre-patchified [N, C*T*P*P] -> [N, E]

The Conv modules only hold the parameters (so the state_dict matches); the fused op
does the work.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfast.ops.patch_embed import interpolate_pos_embed, patch_embed, patch_embed_packed, patch_embed_patchified


class PositionTableCache:
    """Position tables interpolated for other grids, computed once per grid and table.

    A cached table is reused while the position weights are unchanged (same storage and
    version counter) and no gradient has to flow into them; when training, the table is
    interpolated each call so the gradient reaches the weights. At most ``max_tables``
    grids are kept (the oldest goes first), so many image sizes cannot grow it unbounded.
    """

    def __init__(self, max_tables: int = 64):
        self._tables: dict[tuple, torch.Tensor] = {}
        self.max_tables = max_tables

    def get(self, weight: torch.Tensor, grid_hw: tuple[int, int], class_token: bool) -> torch.Tensor:
        if torch.is_grad_enabled() and weight.requires_grad:
            return interpolate_pos_embed(weight, grid_hw, class_token)
        key = (grid_hw, class_token, weight.data_ptr(), weight._version, weight.dtype, weight.device)
        table = self._tables.get(key)
        if table is None:
            # Tables of older weights are stale: keep only the current weights' entries.
            self._tables = {k: v for k, v in self._tables.items() if k[2:] == key[2:]}
            with torch.no_grad():
                table = interpolate_pos_embed(weight, grid_hw, class_token)
            if len(self._tables) >= self.max_tables:
                del self._tables[next(iter(self._tables))]
            self._tables[key] = table
        return table

    def clear(self) -> None:
        self._tables.clear()


def embed_pixels(module: nn.Module, pixel_values: torch.Tensor, interpolate_pos_encoding: bool,
                 cache: PositionTableCache) -> torch.Tensor:
    """The forward of CLIP/SigLIP-style embeddings on ``module`` (an mmfast PatchEmbed or a
    Hugging Face CLIPVisionEmbeddings / SiglipVisionEmbeddings: same attribute names)."""
    conv = module.patch_embedding
    P = conv.weight.shape[-1]
    H, W = pixel_values.shape[-2:]
    if not interpolate_pos_encoding and (H != module.image_size or W != module.image_size):
        raise ValueError(f"pixel_values: image size {H}x{W} does not match the model's "
                         f"{module.image_size}x{module.image_size}; pass interpolate_pos_encoding=True")
    class_embed = getattr(module, "class_embedding", None)
    pos = module.position_embedding.weight
    if interpolate_pos_encoding and H % P == 0 and W % P == 0:
        pos = cache.get(pos, (H // P, W // P), class_embed is not None)
    return patch_embed(pixel_values.to(conv.weight.dtype), conv.weight, conv.bias, pos, class_embed)


class PatchEmbed(nn.Module):
    """ViT patch embedding + learned position embedding (+ CLIP's class token), one fused
    kernel. ``forward(pixel_values, interpolate_pos_encoding=False)``: other image sizes
    need ``interpolate_pos_encoding=True`` (bicubic, as Hugging Face; cached)."""

    def __init__(self, embed_dim: int, image_size: int, patch_size: int, num_channels: int = 3,
                 class_token: bool = False, bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.image_size, self.patch_size = embed_dim, image_size, patch_size
        if class_token:
            self.class_embedding = nn.Parameter(torch.randn(embed_dim, **factory))
        self.patch_embedding = nn.Conv2d(num_channels, embed_dim, patch_size, stride=patch_size, bias=bias, **factory)
        self.num_patches = (image_size // patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_patches + class_token, embed_dim, **factory)
        self._pos_cache = PositionTableCache()

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False):
        return embed_pixels(self, pixel_values, interpolate_pos_encoding, self._pos_cache)

    def forward_packed(self, images):
        """Images [C, H_i, W_i] of different sizes -> ``(tokens [sum_i L_i (+1), E],
        cu_seqlens)``, each with the position table interpolated to its grid (cached)."""
        weight, P = self.patch_embedding.weight, self.patch_size
        class_embed = getattr(self, "class_embedding", None)
        table, tables = self.position_embedding.weight, []
        for image in images:
            H, W = image.shape[-2:]
            fits = H % P == 0 and W % P == 0  # else the op names the bad image size
            tables.append(self._pos_cache.get(table, (H // P, W // P), class_embed is not None) if fits else table)
        return patch_embed_packed([image.to(weight.dtype) for image in images], weight, self.patch_embedding.bias,
                                  tables, class_embed)


class PatchEmbed3d(nn.Module):
    """Qwen2-VL's Conv3d patch embedding as one GEMM over pre-patchified rows
    [N, C*T*P*P] -> [N, E]; its ``proj.weight`` is the Conv3d weight [E, C, T, P, P]
    (``bias``: Qwen3-VL's has one, Qwen2-VL's and Qwen2.5-VL's not)."""

    def __init__(self, patch_size: int = 14, temporal_patch_size: int = 2, in_channels: int = 3,
                 embed_dim: int = 1152, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.patch_size, self.temporal_patch_size = patch_size, temporal_patch_size
        self.in_channels, self.embed_dim = in_channels, embed_dim
        self.patch_dim = in_channels * temporal_patch_size * patch_size * patch_size
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel, stride=kernel, bias=bias, device=device, dtype=dtype)

    def forward(self, hidden_states, grid_thw=None):
        """``grid_thw``, when given, is checked against the row count (one device sync)."""
        if hidden_states.numel() % self.patch_dim:
            raise ValueError(f"hidden_states: expected [N, {self.patch_dim}] patches, "
                             f"got {tuple(hidden_states.shape)}")
        weight = self.proj.weight
        x = hidden_states.reshape(-1, self.patch_dim).to(weight.dtype)
        return patch_embed_patchified(x, weight, self.proj.bias, grid_thw=grid_thw)
