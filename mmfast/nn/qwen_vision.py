"""The Qwen2-VL and Qwen2.5-VL vision towers on mmfast ops.

Both take pre-patchified pixels ``[N, C * Tp * P * P]`` (N patches, block-major over
2x2 merge blocks, as the Hugging Face image processor emits them) and ``grid_thw``
[images, 3], run a ViT over the packed patch stream with 2D rotary embeddings, and merge
each 2x2 block into one LLM token: output [N / 4, out_hidden_size].

- ``Qwen25VisionTransformer``: RMSNorm, SwiGLU MLP, attention inside 112 px windows
  (64 patches) in every block but ``fullatt_block_indexes``, which attend over each
  whole frame; tokens are kept in window order between the blocks and put back in
  stream order after the merger.
- ``Qwen2VisionTransformer``: LayerNorm, QuickGELU MLP, every block attends over each
  whole frame.

Parameter names and shapes equal Hugging Face's (``Qwen2_5_VisionTransformerPretrainedModel``,
``Qwen2VisionTransformerPretrainedModel``), so ``load_state_dict(hf_model.model.visual.state_dict())``
works; :meth:`from_config` takes their vision configs. Index plumbing comes from
:func:`mmfast.ops.vision_windows.qwen_vision_indices` (one host read of ``grid_thw``
per call, cached per grid). Pre-norm residual adds are fused into the norms.

Built from the shared vision modules: :class:`~mmfast.nn.patch_embed.PatchEmbed3d` (the
Conv3d as mmfast's patch-embedding GEMM, as vLLM does), :class:`~mmfast.nn.mlp.SwiGLUMLP` /
:class:`~mmfast.nn.mlp.MLP` (activations as fused elementwise ops) and
:class:`~mmfast.nn.merger.PatchMerger`; the other GEMMs are plain nn.Linear.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from mmfast.nn.attention import VarlenAttention
from mmfast.nn.merger import NORMS, PatchMerger
from mmfast.nn.mlp import MLP, SwiGLUMLP
from mmfast.nn.patch_embed import PatchEmbed3d
from mmfast.ops.vision_windows import qwen_vision_indices, vision_rotary_cos_sin


class QwenVisionBlock(nn.Module):
    """Pre-norm block. ``forward(x, residual, ...)`` reads the residual stream as
    ``x + residual`` (``residual`` None: ``x``) and returns ``(mlp_out, stream)``, the new
    stream being their sum: the adds happen inside the fused norms."""

    def __init__(self, dim: int, heads: int, norm: str, mlp: nn.Module):
        super().__init__()
        self.norm1 = NORMS[norm](dim, eps=1e-6)
        self.norm2 = NORMS[norm](dim, eps=1e-6)
        self.attn = VarlenAttention(dim, heads, qkv_bias=True)
        self.mlp = mlp

    def forward(self, x: Tensor, residual: Tensor | None, cu_seqlens: Tensor, rotary: tuple[Tensor, Tensor],
                max_seqlen: int) -> tuple[Tensor, Tensor]:
        if residual is None:
            normed, stream = self.norm1(x), x
        else:
            normed, stream = self.norm1(x, residual=residual)
        normed, stream = self.norm2(self.attn(normed, cu_seqlens, rotary, max_seqlen), residual=stream)
        return self.mlp(normed), stream


class _QwenVisionTower(nn.Module):
    def __init__(self, *, depth: int, dim: int, heads: int, out_dim: int, patch_size: int,
                 temporal_patch_size: int, in_channels: int, spatial_merge_size: int, rope_theta: float,
                 norm: str, make_mlp, window_size: int | None, fullatt_block_indexes: Sequence[int]):
        super().__init__()
        if dim % heads or (dim // heads) % 4:
            raise ValueError(f"dim: {dim} / heads {heads} must give a head dim that is a multiple of 4")
        self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
        self.window_size, self.fullatt_block_indexes = window_size, tuple(fullatt_block_indexes)
        self.head_dim, self.rope_theta = dim // heads, rope_theta
        self.patch_embed = PatchEmbed3d(patch_size, temporal_patch_size, in_channels, dim)
        self.blocks = nn.ModuleList([QwenVisionBlock(dim, heads, norm, make_mlp()) for _ in range(depth)])
        self.merger = PatchMerger(dim=out_dim, context_dim=dim, spatial_merge_size=spatial_merge_size, norm=norm)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor, return_hidden_states: bool = False):
        """Merged tokens [N / merge^2, out_dim] in stream order; with
        ``return_hidden_states``, also the last block's output [N, dim] in stream order."""
        ix = qwen_vision_indices(grid_thw, spatial_merge_size=self.spatial_merge_size,
                                 window_size=self.window_size, patch_size=self.patch_size)
        patches = pixel_values.numel() // self.patch_embed.patch_dim
        if patches != ix.position_ids.shape[0]:
            raise ValueError(f"grid_thw: describes {ix.position_ids.shape[0]} patches, pixel_values holds {patches}")
        x = self.patch_embed(pixel_values)
        unit = self.spatial_merge_size ** 2
        windowed = self.window_size is not None
        positions = ix.position_ids
        if windowed:  # window order, whole merge blocks at a time
            x = x.view(-1, unit, x.shape[-1])[ix.window_index].flatten(0, 1)
            positions = positions.view(-1, unit, 2)[ix.window_index].flatten(0, 1)
        rotary = vision_rotary_cos_sin(positions, self.head_dim, self.rope_theta)

        residual = None
        for i, block in enumerate(self.blocks):
            if not windowed or i in self.fullatt_block_indexes:
                x, residual = block(x, residual, ix.cu_seqlens, rotary, ix.max_seqlen)
            else:
                x, residual = block(x, residual, ix.cu_window_seqlens, rotary, ix.max_window_seqlen)
        if residual is None:  # depth 0
            merged = self.merger(x)
        else:  # the last residual add happens in the merger's norm
            merged, x = self.merger(x, residual)
        if windowed:
            merged = merged[ix.reverse_window_index]
        if not return_hidden_states:
            return merged
        if windowed:
            x = x.view(-1, unit, x.shape[-1])[ix.reverse_window_index].flatten(0, 1)
        return merged, x


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


class Qwen25VisionTransformer(_QwenVisionTower):
    """The Qwen2.5-VL vision tower (see the module docstring). Defaults: Qwen2.5-VL-7B."""

    def __init__(self, *, depth: int = 32, hidden_size: int = 1280, num_heads: int = 16,
                 intermediate_size: int = 3420, out_hidden_size: int = 3584, patch_size: int = 14,
                 temporal_patch_size: int = 2, in_channels: int = 3, spatial_merge_size: int = 2,
                 window_size: int = 112, fullatt_block_indexes: Sequence[int] = (7, 15, 23, 31),
                 rope_theta: float = 10000.0):
        super().__init__(depth=depth, dim=hidden_size, heads=num_heads, out_dim=out_hidden_size,
                         patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                         in_channels=in_channels, spatial_merge_size=spatial_merge_size, rope_theta=rope_theta,
                         norm="rms", make_mlp=lambda: SwiGLUMLP(hidden_size, intermediate_size),
                         window_size=window_size, fullatt_block_indexes=fullatt_block_indexes)

    @classmethod
    def from_config(cls, config) -> "Qwen25VisionTransformer":
        """From a Hugging Face ``Qwen2_5_VLVisionConfig``."""
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"config.hidden_act: only 'silu' (SwiGLU) is supported, got {config.hidden_act!r}")
        return cls(depth=config.depth, hidden_size=config.hidden_size, num_heads=config.num_heads,
                   intermediate_size=config.intermediate_size, out_hidden_size=config.out_hidden_size,
                   patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
                   in_channels=config.in_channels, spatial_merge_size=config.spatial_merge_size,
                   window_size=config.window_size, fullatt_block_indexes=config.fullatt_block_indexes,
                   rope_theta=_rope_theta(config))


class Qwen2VisionTransformer(_QwenVisionTower):
    """The Qwen2-VL vision tower (see the module docstring). Defaults: Qwen2-VL-7B."""

    def __init__(self, *, depth: int = 32, embed_dim: int = 1280, num_heads: int = 16, mlp_ratio: float = 4,
                 hidden_size: int = 3584, patch_size: int = 14, temporal_patch_size: int = 2,
                 in_channels: int = 3, spatial_merge_size: int = 2, rope_theta: float = 10000.0):
        mlp_hidden = int(embed_dim * mlp_ratio)
        super().__init__(depth=depth, dim=embed_dim, heads=num_heads, out_dim=hidden_size,
                         patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                         in_channels=in_channels, spatial_merge_size=spatial_merge_size, rope_theta=rope_theta,
                         norm="layer", make_mlp=lambda: MLP(embed_dim, mlp_hidden, "quick_gelu"),
                         window_size=None, fullatt_block_indexes=())

    @classmethod
    def from_config(cls, config) -> "Qwen2VisionTransformer":
        """From a Hugging Face ``Qwen2VLVisionConfig``."""
        if getattr(config, "hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(f"config.hidden_act: only 'quick_gelu' is supported, got {config.hidden_act!r}")
        return cls(depth=config.depth, embed_dim=config.embed_dim, num_heads=config.num_heads,
                   mlp_ratio=config.mlp_ratio, hidden_size=config.hidden_size, patch_size=config.patch_size,
                   temporal_patch_size=config.temporal_patch_size, in_channels=config.in_channels,
                   spatial_merge_size=config.spatial_merge_size, rope_theta=_rope_theta(config))
