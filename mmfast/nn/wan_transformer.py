"""Wan 2.1 / 2.2 video DiT (diffusers ``WanTransformer3DModel``) attention and blocks on
mmfast ops, with diffusers' attribute names.

Attention (``WanAttention``): q/k RMSNorm over the whole inner dim (all heads at once, as
Wan does) on ``rms_norm``; the 3D rotary (frame, height, width axes concatenated along
the head dim; pairs interleaved, (x[2j], x[2j + 1])) on ``apply_rotary(interleaved=True)``,
q and k in one launch; attention on ``mmfast.ops.attention`` in the projections' own
[B, T, H, D] layout. Wan 2.1 I2V's image-context branch (``add_k_proj``: the first
``Tc - 512`` context tokens are image tokens) is a second attention of the same queries,
added to the text one, as diffusers does.

Block (``WanTransformerBlock``): the per-sample modulation ``scale_shift_table + temb``
(six [B, C] rows) feeds ``adaln_modulate`` (FP32LayerNorm without affine, modulated, in
one pass) and ``gated_residual`` for the self-attention and the feed-forward; the
cross-attention norm is ``layer_norm``. Every statistic accumulates in float32 and every
output has the hidden states' dtype, as diffusers' ``.float()`` ... ``.type_as`` does.
Wan 2.2 TI2V's per-token modulation (``temb`` [B, T, 6, C]) runs on the same two ops with
the tokens as rows ([B * T, 1, C], one modulation row each).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from mmfast.ops.adaln import adaln_modulate, gated_residual
from mmfast.ops.attention import attention
from mmfast.ops.norm import layer_norm, rms_norm
from mmfast.ops.rotary import apply_rotary

# diffusers' WanAttnProcessor: the text encoder's context length, after which the I2V
# image tokens are told apart from the text ones (hard-coded there too).
TEXT_CONTEXT_TOKENS = 512


def _qk_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """torch.nn.RMSNorm over the inner dim on ``rms_norm``; anything else runs as it is."""
    if type(norm) is not nn.RMSNorm or (norm.weight is not None and norm.weight.dtype != x.dtype):
        return norm(x)
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    return rms_norm(x, norm.weight, eps)


def _projections(attn, hidden_states: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """diffusers' ``_get_qkv_projections``, fused projections (``fuse_projections()``) included."""
    source = hidden_states if context is None else context
    if getattr(attn, "fused_projections", False):
        if not attn.is_cross_attention:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return (attn.to_q(hidden_states), *attn.to_kv(source).chunk(2, dim=-1))
    return attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)


def _image_projections(attn, image_context: Tensor) -> tuple[Tensor, Tensor]:
    if getattr(attn, "fused_projections", False):
        return attn.to_added_kv(image_context).chunk(2, dim=-1)
    return attn.add_k_proj(image_context), attn.add_v_proj(image_context)


def rotary_tables(rotary_emb, q: Tensor) -> tuple[Tensor, Tensor]:
    """Wan's full-width, repeat-interleaved (cos, sin) [1 or B, T, 1, D] -> the half-width
    tables ``apply_rotary`` takes ([T, D/2], or [B, T, D/2] per sample). Pair j's angle
    is column 2j of cos and column 2j + 1 of sin, the columns diffusers reads."""
    if not (isinstance(rotary_emb, (tuple, list)) and len(rotary_emb) == 2):
        raise ValueError(f"rotary_emb: expected a pair (freqs_cos, freqs_sin), got {type(rotary_emb).__name__}")
    cos, sin = rotary_emb
    batch, tokens, heads, dim = q.shape
    for name, t in (("freqs_cos", cos), ("freqs_sin", sin)):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[0] not in (1, batch) or t.shape[1] != tokens \
                or t.shape[2] != 1:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"rotary_emb: {name}: expected [1 or B, T, 1, D] = [1 or {batch}, {tokens}, 1, {dim}] "
                             f"(one row per video token), got {shape}")
        if t.shape[-1] != dim:
            raise ValueError(f"rotary_emb: {name}: the frame, height and width rotary axes sum to {t.shape[-1]}, "
                             f"expected the head dim {dim} (WanRotaryPosEmbed's attention_head_dim must be the "
                             "model's)")
    cos, sin = cos[:, :, 0, 0::2], sin[:, :, 0, 1::2]
    return (cos[0], sin[0]) if cos.shape[0] == 1 else (cos, sin)


Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


def wan_attention_forward(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                          rotary_emb=None, attend: Attend | None = None) -> Tensor:
    """diffusers ``WanAttnProcessor`` semantics without a mask. ``attend(q, k, v)``, when
    given, takes the place of mmfast attention for the self-attention (q and k rotated),
    on [B, T, H, D] heads (for sequence parallelism)."""
    image_context = None
    if attn.add_k_proj is not None:
        if encoder_hidden_states is None:
            raise ValueError("encoder_hidden_states: this WanAttention has the I2V image branch (add_k_proj); "
                             f"it needs the image tokens followed by {TEXT_CONTEXT_TOKENS} text tokens")
        split = encoder_hidden_states.shape[1] - TEXT_CONTEXT_TOKENS
        image_context, encoder_hidden_states = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]

    query, key, value = _projections(attn, hidden_states, encoder_hidden_states)
    query, key = _qk_norm(attn.norm_q, query), _qk_norm(attn.norm_k, key)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    if rotary_emb is not None:
        cos, sin = rotary_tables(rotary_emb, query)
        query, key = apply_rotary(query, key, cos, sin, interleaved=True)

    out = (attend or attention)(query, key, value) if encoder_hidden_states is None else attention(query, key, value)
    if image_context is not None:
        key_img, value_img = _image_projections(attn, image_context)
        key_img = _qk_norm(attn.norm_added_k, key_img)
        key_img, value_img = (t.unflatten(2, (attn.heads, -1)) for t in (key_img, value_img))
        out = out + attention(query, key_img, value_img)
    return attn.to_out[1](attn.to_out[0](out.flatten(2)))  # projection, dropout


def _is_layer_norm(norm, affine: bool | None) -> bool:
    """An FP32LayerNorm (or nn.LayerNorm) over the last dim; ``affine`` None: either."""
    return (isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1
            and (affine is None or norm.elementwise_affine == affine)
            and (not norm.elementwise_affine or norm.bias is not None))


def wan_block_fusable(block) -> bool:
    """Whether a diffusers WanTransformerBlock is of the configuration the mmfast forward
    covers: LayerNorms without affine under both modulations, the cross-attention norm a
    LayerNorm or none, a (1, 6, C) modulation table."""
    table = getattr(block, "scale_shift_table", None)
    return (_is_layer_norm(block.norm1, False) and _is_layer_norm(block.norm3, False)
            and (type(block.norm2) is nn.Identity or _is_layer_norm(block.norm2, None))
            and isinstance(table, Tensor) and table.dim() == 3 and table.shape[:2] == (1, 6))


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """FP32LayerNorm(x.float()).type_as(x) in one pass (float32 statistics, x's dtype out)."""
    return layer_norm(x, norm.weight, norm.bias, norm.eps)


def _per_token(x: Tensor) -> Tensor:
    """[B, T, C] -> [B * T, 1, C]: every token its own "sample", so that the per-sample
    modulation ops take one modulation row per token (LayerNorm is per token anyway)."""
    return x.reshape(-1, 1, x.shape[-1])


def wan_block_forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                      rotary_emb) -> Tensor:
    """diffusers WanTransformerBlock.forward; ``temb`` [B, 6, C] (Wan 2.1, Wan 2.2 14B) or
    [B, T, 6, C] (Wan 2.2 TI2V: one modulation per token, run on the same fused ops with
    each token as its own row)."""
    per_token = temb.ndim == 4
    if per_token:
        batch, tokens = hidden_states.shape[:2]
        if temb.shape[:2] != (batch, tokens):
            raise ValueError(f"temb: per-token modulation [B, T, 6, C] must match the hidden states' [B, T] = "
                             f"{(batch, tokens)}, got {tuple(temb.shape)}")
        rows = (self.scale_shift_table.unsqueeze(0) + temb.float()).unbind(2)
        modulation = [m.reshape(batch * tokens, -1) for m in rows]
    else:
        modulation = (self.scale_shift_table + temb.float()).unbind(1)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = modulation

    def modulate(x, shift, scale, eps):
        if not per_token:
            return adaln_modulate(x, shift, scale, eps)
        return adaln_modulate(_per_token(x), shift, scale, eps).view(x.shape)

    def residual(x, gate, y):
        if not per_token:
            return gated_residual(x, gate, y)
        return gated_residual(_per_token(x), gate, _per_token(y)).view(x.shape)

    normed = modulate(hidden_states, shift_msa, scale_msa, self.norm1.eps)
    hidden_states = residual(hidden_states, gate_msa, self.attn1(normed, None, None, rotary_emb))

    normed = hidden_states if type(self.norm2) is nn.Identity else _layer_norm(self.norm2, hidden_states)
    hidden_states = hidden_states + self.attn2(normed, encoder_hidden_states, None, None)

    normed = modulate(hidden_states, c_shift_msa, c_scale_msa, self.norm3.eps)
    return residual(hidden_states, c_gate_msa, self.ffn(normed))


__all__ = ["TEXT_CONTEXT_TOKENS", "rotary_tables", "wan_attention_forward", "wan_block_forward",
           "wan_block_fusable"]
