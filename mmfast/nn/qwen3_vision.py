"""The Qwen3-VL vision tower on mmfast ops.

Takes what the Qwen2-VL / Qwen2.5-VL towers take (pre-patchified pixels
``[N, C * Tp * P * P]``, block-major over 2x2 merge blocks, and ``grid_thw`` [images, 3])
and differs from them in:

- the patch embedding has a bias, and a learned position grid (``pos_embed``: S x S rows,
  S = 48 in the released models) is resampled bilinearly (aligned corners) to each
  frame's h x w grid and added to it;
- LayerNorm, GELU-tanh MLP (:class:`~mmfast.nn.mlp.LinearFcMLP`), and every block attends
  over each whole frame (varlen attention, 2D rotary fused; no windows);
- DeepStack: the hidden states after the blocks in ``deepstack_visual_indexes`` go
  through their own mergers (LayerNorm after the 2x2 shuffle), one feature map per index,
  which the language model adds to the hidden states of its first layers.

The position grid: :func:`torch.nn.functional.embedding_bag` over the four bilinear taps
per patch (cached per grid by :func:`mmfast.ops.vision_windows.qwen_vision_indices`), a
weighted sum in one pass with no [N, 4, C] intermediate, in float32 as Hugging Face's
(its tap weights are float32), then added to the patch embeddings inside the first
block's fused norm (as its residual input): no pass of its own. No kernel is written for
it: one would save a pass over the [N, C] result only fused into the patch-embedding
GEMM's epilogue.

Parameter names and shapes equal Hugging Face's ``Qwen3VLVisionModel``, so
``load_state_dict(hf_model.model.visual.state_dict())`` works; :meth:`from_config` takes
its config.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.nn.merger import Qwen3PatchMerger
from mmfast.nn.mlp import LinearFcMLP
from mmfast.nn.patch_embed import PatchEmbed3d
from mmfast.nn.qwen_vision import QwenVisionBlock, _rope_theta
from mmfast.ops.vision_windows import qwen_vision_indices, vision_rotary_cos_sin


class Qwen3VisionOutput(NamedTuple):
    merged: Tensor                # [N / merge^2, out_hidden_size], stream order
    deepstack: list[Tensor]       # one [N / merge^2, out_hidden_size] per deepstack_visual_indexes entry
    last_hidden_state: Tensor | None = None  # [N, hidden_size], with return_hidden_states


class Qwen3VisionTransformer(nn.Module):
    """The Qwen3-VL vision tower (see the module docstring). Defaults: Qwen3-VL-8B."""

    def __init__(self, *, depth: int = 27, hidden_size: int = 1152, num_heads: int = 16,
                 intermediate_size: int = 4304, out_hidden_size: int = 4096, patch_size: int = 16,
                 temporal_patch_size: int = 2, in_channels: int = 3, spatial_merge_size: int = 2,
                 num_position_embeddings: int = 2304, deepstack_visual_indexes: Sequence[int] = (8, 16, 24),
                 hidden_act: str = "gelu_pytorch_tanh", rope_theta: float = 10000.0):
        super().__init__()
        if hidden_size % num_heads or (hidden_size // num_heads) % 4:
            raise ValueError(f"hidden_size: {hidden_size} / num_heads {num_heads} must give a head dim that is a "
                             "multiple of 4")
        side = math.isqrt(num_position_embeddings)
        if num_position_embeddings < 1 or side * side != num_position_embeddings:
            raise ValueError(f"num_position_embeddings: expected a square (S x S grid), got {num_position_embeddings}")
        indexes = tuple(int(i) for i in deepstack_visual_indexes)
        if len(set(indexes)) != len(indexes) or any(not 0 <= i < depth for i in indexes):
            raise ValueError(f"deepstack_visual_indexes: expected distinct block indexes in [0, {depth}), "
                             f"got {list(deepstack_visual_indexes)}")
        self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
        self.head_dim, self.rope_theta = hidden_size // num_heads, float(rope_theta)
        self.num_grid_per_side = side
        self.deepstack_visual_indexes = indexes
        self.patch_embed = PatchEmbed3d(patch_size, temporal_patch_size, in_channels, hidden_size, bias=True)
        self.pos_embed = nn.Embedding(num_position_embeddings, hidden_size)
        self.blocks = nn.ModuleList([
            QwenVisionBlock(hidden_size, num_heads, "layer", LinearFcMLP(hidden_size, intermediate_size, hidden_act))
            for _ in range(depth)])
        self.merger = Qwen3PatchMerger(out_hidden_size, hidden_size, spatial_merge_size)
        self.deepstack_merger_list = nn.ModuleList([
            Qwen3PatchMerger(out_hidden_size, hidden_size, spatial_merge_size, postshuffle_norm=True)
            for _ in indexes])

    @classmethod
    def from_config(cls, config) -> "Qwen3VisionTransformer":
        """From a Hugging Face ``Qwen3VLVisionConfig``."""
        return cls(depth=config.depth, hidden_size=config.hidden_size, num_heads=config.num_heads,
                   intermediate_size=config.intermediate_size, out_hidden_size=config.out_hidden_size,
                   patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
                   in_channels=config.in_channels, spatial_merge_size=config.spatial_merge_size,
                   num_position_embeddings=config.num_position_embeddings,
                   deepstack_visual_indexes=config.deepstack_visual_indexes, hidden_act=config.hidden_act,
                   rope_theta=_rope_theta(config))

    def position_embedding(self, interp_indices: Tensor, interp_weights: Tensor) -> Tensor:
        """[N, hidden] float32: the learned grid at every patch (the four taps' weighted sum)."""
        table = self.pos_embed.weight.float()
        return F.embedding_bag(interp_indices, table, per_sample_weights=interp_weights, mode="sum")

    def forward(self, pixel_values: Tensor, grid_thw: Tensor, return_hidden_states: bool = False) -> Qwen3VisionOutput:
        """Merged tokens and DeepStack features (see :class:`Qwen3VisionOutput`)."""
        ix = qwen_vision_indices(grid_thw, spatial_merge_size=self.spatial_merge_size, patch_size=self.patch_size,
                                 position_grid_side=self.num_grid_per_side)
        patches = pixel_values.numel() // self.patch_embed.patch_dim
        if patches != ix.position_ids.shape[0] or pixel_values.numel() % self.patch_embed.patch_dim:
            raise ValueError(f"grid_thw: describes {ix.position_ids.shape[0]} patches of "
                             f"{self.patch_embed.patch_dim} values, pixel_values holds {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values)
        residual = self.position_embedding(ix.interp_indices, ix.interp_weights).to(x.dtype)  # the first norm adds it
        rotary = vision_rotary_cos_sin(ix.position_ids, self.head_dim, self.rope_theta)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x, residual = block(x, residual, ix.cu_seqlens, rotary, ix.max_seqlen)
            if i in self.deepstack_visual_indexes:  # the DeepStack merger reads the stream itself
                x, residual = x + residual, None
                deepstack.append(self.deepstack_merger_list[self.deepstack_visual_indexes.index(i)](x))
        if residual is None:
            merged = self.merger(x)
        else:  # the last residual add happens in the merger's norm
            merged, x = self.merger(x, residual)
        return Qwen3VisionOutput(merged, deepstack, x if return_hidden_states else None)
