"""Replacements shared by the Qwen2-VL, Qwen2.5-VL and Qwen3-VL families, whose vision
towers share their attention, rotary and index conventions (Hugging Face transformers 5.x)."""

from __future__ import annotations

from torch import nn

from mmfast.integrations.patching import PatchHandle
from mmfast.integrations.transformers._fused_layers import hf_activation_name, patch_activation_mlp
from mmfast.nn.activation import activation_module
from mmfast.ops.activation import swiglu
from mmfast.ops.attention import attention
from mmfast.ops.rotary import apply_rotary
from mmfast.ops.vision_windows import qwen_vision_indices


def _vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None,
                              **kwargs):
    """Packed varlen attention over every segment at once (HF's sdpa path loops over
    them in Python), rotary fused over q and k."""
    tokens = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).view(tokens, 3, self.num_heads, -1).unbind(1)
    if position_embeddings is not None:
        # HF's vision tables are the per-pair angles twice over: keep the first half.
        cos, sin = position_embeddings
        half = cos.shape[-1] // 2
        q, k = apply_rotary(q, k, cos[..., :half], sin[..., :half])
    out = attention(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                    max_seqlen_k=max_seqlen, scale=self.scaling)
    return self.proj(out.reshape(tokens, -1))


def patch_vision_attention(module: nn.Module, handle: PatchHandle, name: str) -> None:
    handle.set_forward(module, _vision_attention_forward, "varlen attention + fused rotary", name)


def _swiglu_mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def patch_swiglu_mlp(module: nn.Module, handle: PatchHandle, name: str) -> None:
    """down(act(gate(x)) * up(x)) MLPs (vision and language model) whose act is SiLU."""
    if type(module.act_fn).__name__ in ("SiLUActivation", "SiLU"):
        handle.set_forward(module, _swiglu_mlp_forward, "swiglu", name)


def patch_quick_gelu_mlp(module: nn.Module, handle: PatchHandle, name: str) -> None:
    """Qwen2-VL's vision MLP, fc2(act(fc1(x))), when its act is QuickGELU."""
    if type(module.act).__name__ == "QuickGELUActivation":
        patch_activation_mlp(module, handle, name, "quick_gelu")


def patch_linear_fc_mlp(module: nn.Module, handle: PatchHandle, name: str) -> None:
    """Qwen3-VL's vision MLP, linear_fc2(act(linear_fc1(x))), when mmfast has its act
    (GELU-tanh in the released models)."""
    hidden_act = hf_activation_name(module.act_fn)
    if hidden_act is None:
        return
    act = activation_module(hidden_act)

    def forward(self, hidden_state):
        return self.linear_fc2(act(self.linear_fc1(hidden_state)))

    handle.set_forward(module, forward, f"fused {hidden_act}", name)


def patch_linear_fc_merger(module: nn.Module, handle: PatchHandle, name: str) -> None:
    """Qwen3-VL's patch mergers (the final one and each DeepStack layer's): the norm
    before (``use_postshuffle_norm`` False: on each token) or after (True: on each merged
    group) the 2x2 shuffle, then linear_fc2(GELU(linear_fc1)); the GELU becomes one fused
    pass (the LayerNorm is patched on its own)."""
    hidden_act = hf_activation_name(module.act_fn)
    if hidden_act is None:
        return
    act = activation_module(hidden_act)

    def forward(self, x):
        if self.use_postshuffle_norm:
            x = self.norm(x.view(-1, self.hidden_size))
        else:
            x = self.norm(x).view(-1, self.hidden_size)
        return self.linear_fc2(act(self.linear_fc1(x)))

    handle.set_forward(module, forward, f"merger, fused {hidden_act}", name)


def patch_vision_tower(module: nn.Module, handle: PatchHandle, name: str) -> None:
    """Hand the tower precomputed, cached index plumbing (position ids, cu_seqlens,
    windows, max lengths; Qwen3-VL: the position grid's bilinear taps) through the kwargs
    its Hugging Face forward accepts for them, after checking that ``grid_thw`` describes
    as many patches as the pixels hold."""
    def forward(self, hidden_states, grid_thw, **kwargs):
        # Everything read from ``self`` at call time (not closed over at patch time), so a
        # deep copy runs its own tower and config.
        config = self.config
        window_size = getattr(config, "window_size", None) if hasattr(config, "fullatt_block_indexes") else None
        grid_side = getattr(self, "num_grid_per_side", None)  # Qwen3-VL's learned position grid
        ix = qwen_vision_indices(grid_thw, spatial_merge_size=config.spatial_merge_size,
                                 window_size=window_size, patch_size=config.patch_size,
                                 position_grid_side=grid_side)
        patch_values = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        patches = ix.position_ids.shape[0]
        if hidden_states.numel() != patches * patch_values:
            raise ValueError(f"grid_thw: describes {patches} patches of {patch_values} values, pixel_values "
                             f"(the tower's hidden_states) holds {tuple(hidden_states.shape)}")
        given = {"position_ids": ix.position_ids, "cu_seqlens": ix.cu_seqlens, "max_seqlen": ix.max_seqlen}
        if window_size is not None:
            given.update(window_index=ix.window_index, cu_window_seqlens=ix.cu_window_seqlens,
                         max_window_seqlen=ix.max_window_seqlen)
        if grid_side is not None:
            given.update(interp_indices=ix.interp_indices, interp_weights=ix.interp_weights)
        for key, value in given.items():
            kwargs.setdefault(key, value)
        return type(self).forward(self, hidden_states, grid_thw, **kwargs)

    handle.set_forward(module, forward, "cached vision indices", name)
