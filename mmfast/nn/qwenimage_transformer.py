"""Qwen-Image MM-DiT (diffusers ``QwenImageTransformer2DModel``) attention and blocks on
mmfast ops, with diffusers' attribute names.

Attention (``QwenDoubleStreamAttnProcessor2_0``'s math): image and text streams each
projected to q, k, v; per-head q/k RMSNorms of both streams on ``rms_norm``; the 3-axis
rotary; one attention over the text tokens followed by the image tokens; each stream's
output projection.

Rotary layout. diffusers builds Qwen-Image's tables (``QwenEmbedRope``) as complex
[T, D/2] tensors, one per stream (image, text), and rotates interleaved pairs
(x[2j], x[2j + 1]) as complex numbers by table column j (``apply_rotary_emb_qwen(...,
use_real=False)``). Once per attention call the two tables are joined (text first, as the
tokens are) and split into real (cos) and imaginary (sin) parts, the half-width [T, D/2]
tables mmfast's rotary takes. Without a mask the rotation runs inside the attention
kernel: mmfast's kernels rotate halves (x[j], x[j + D/2]), and scores do not change when
q and k have their head dims permuted alike, so every pair is moved to (j, j + D/2) in the
copy that joins the text and image tokens, which diffusers makes anyway
(:func:`mmfast.nn.flux_attention.pairs_to_halves`, as for FLUX). With a text key-padding
mask (``encoder_hidden_states_mask``, boolean) q and k are rotated by ``apply_rotary``
(interleaved, one launch) and the variable-length kernel attends over the kept keys (two
device->host syncs per call, see :mod:`mmfast.nn.diffusion_attention`).

Block (``QwenImageTransformerBlock``): each stream's six per-sample modulation rows feed
``adaln_modulate`` (LayerNorm without affine, modulated, in one pass) and
``gated_residual``, for the attention and the MLP. Per-token modulation (``zero_cond_t``,
the edit models' ``modulate_index``), and streams whose batch differs from the timestep
embedding's (diffusers broadcasts them: a pipeline given one negative prompt for several
prompts), run diffusers' own block.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from mmfast.nn.diffusion_attention import masked_attention
from mmfast.nn.flux_attention import head_rms_norm, pairs_to_halves
from mmfast.ops.adaln import adaln_modulate, gated_residual
from mmfast.ops.attention import attention
from mmfast.ops.norm import rms_norm
from mmfast.ops.rotary import apply_rotary

_FP16_MAX = 65504

# attend(q, k, v, rotary) on the joint [B, T, H, D] tensors (text first): mmfast attention,
# or the sequence-parallel one.
Attend = Callable[[Tensor, Tensor, Tensor, "tuple[Tensor, Tensor] | None"], Tensor]


def qk_norm(norm: nn.Module | None, x: Tensor) -> Tensor:
    """A per-head q/k norm on [B, T, H, D]: diffusers' RMSNorm (no bias) or torch's
    nn.RMSNorm on ``rms_norm``; None is no norm; anything else (hooked, another class, a
    weight of another dtype: diffusers' own promotion rules) runs as it is."""
    if norm is None:
        return x
    if type(norm).__module__ == "diffusers.models.normalization" and type(norm).__name__ == "RMSNorm":
        weight = norm.weight
        if (getattr(norm, "bias", None) is None and not norm._forward_hooks and not norm._forward_pre_hooks
                and (weight is None or weight.dtype == x.dtype)):
            return rms_norm(x, weight, norm.eps)
        return norm(x)
    return head_rms_norm(norm, x)


def _check_table(name: str, table, tokens: int, head_dim: int) -> None:
    if not isinstance(table, Tensor) or not table.is_complex():
        what = f"{table.dtype} Tensor" if isinstance(table, Tensor) else type(table).__name__
        raise ValueError(f"image_rotary_emb: the {name} table: expected a complex Tensor [T, D/2] as QwenEmbedRope "
                         f"builds it, got a {what}")
    if table.dim() != 2 or table.shape[0] != tokens:
        raise ValueError(f"image_rotary_emb: the {name} table: expected {tokens} rows (one per {name} token), got "
                         f"shape {tuple(table.shape)}; the model's img_shapes must give the image token count")
    if 2 * table.shape[1] != head_dim:
        raise ValueError(f"image_rotary_emb: the {name} table has {table.shape[1]} columns (a rotary dim of "
                         f"{2 * table.shape[1]}), expected D/2 = {head_dim // 2}; the rotary axes (axes_dims_rope) "
                         f"must sum to the attention head dim {head_dim}")


def rotary_tables(image_rotary_emb, text_tokens: int, image_tokens: int, head_dim: int,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """diffusers' (image, text) complex tables -> (cos, sin) [Tt + Ti, D/2] for the joint
    sequence, text rows first, float32. Checks shapes only (no sync)."""
    if not (isinstance(image_rotary_emb, (tuple, list)) and len(image_rotary_emb) == 2):
        raise ValueError("image_rotary_emb: expected a pair (image table, text table) as QwenEmbedRope builds it, "
                         f"got {type(image_rotary_emb).__name__}")
    image, text = image_rotary_emb
    _check_table("image", image, image_tokens, head_dim)
    _check_table("text", text, text_tokens, head_dim)
    joint = torch.view_as_real(torch.cat([text, image]).to(device))  # [T, D/2, 2]: (cos, sin) per column
    return joint[..., 0].contiguous(), joint[..., 1].contiguous()


def _heads(t: Tensor, head_dim: int) -> Tensor:
    return t.unflatten(-1, (-1, head_dim))


def qwen_attention_forward(attn, hidden_states: Tensor, encoder_hidden_states: Tensor, image_rotary_emb=None,
                           keep: Tensor | None = None, attend: Attend | None = None,
                           tokens: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """``QwenDoubleStreamAttnProcessor2_0`` without an ``attention_mask``: returns the
    (image, text) outputs after their projections. ``keep`` [B, Tt] (True = attend) masks
    text keys. ``attend``, when given (no ``keep``), takes the place of mmfast attention;
    ``tokens`` = (text, image) are then the whole streams' token counts, for the rotary
    tables (sequence parallelism: this rank holds a part of each stream)."""
    head_dim = attn.inner_dim // attn.heads  # as diffusers: the head count may be sharded (tensor parallel)
    query = qk_norm(attn.norm_q, _heads(attn.to_q(hidden_states), head_dim))
    key = qk_norm(attn.norm_k, _heads(attn.to_k(hidden_states), head_dim))
    value = _heads(attn.to_v(hidden_states), head_dim)
    text_query = qk_norm(attn.norm_added_q, _heads(attn.add_q_proj(encoder_hidden_states), head_dim))
    text_key = qk_norm(attn.norm_added_k, _heads(attn.add_k_proj(encoder_hidden_states), head_dim))
    text_value = _heads(attn.add_v_proj(encoder_hidden_states), head_dim)
    local_text = encoder_hidden_states.shape[1]
    text_tokens, image_tokens = tokens if tokens is not None else (local_text, hidden_states.shape[1])

    rotary = None
    if image_rotary_emb is not None:
        rotary = rotary_tables(image_rotary_emb, text_tokens, image_tokens, head_dim, query.device)
    joint_value = torch.cat([text_value, value], dim=1)
    if keep is not None:
        if attend is not None:
            raise ValueError("keep: a key-padding mask cannot go with attend")
        joint_query, joint_key = torch.cat([text_query, query], dim=1), torch.cat([text_key, key], dim=1)
        if rotary is not None:
            joint_query, joint_key = apply_rotary(joint_query, joint_key, *rotary, interleaved=True)
        image_keep = keep.new_ones((keep.shape[0], query.shape[1]))
        out = masked_attention(joint_query, joint_key, joint_value, torch.cat([keep, image_keep], dim=1))
    else:
        if rotary is None:
            joint_query, joint_key = torch.cat([text_query, query], dim=1), torch.cat([text_key, key], dim=1)
        else:
            joint_query, joint_key = pairs_to_halves([text_query, query]), pairs_to_halves([text_key, key])
        if attend is not None:
            out = attend(joint_query, joint_key, joint_value, rotary)
        else:
            out = attention(joint_query, joint_key, joint_value, rotary=rotary)
    out = out.flatten(-2).to(joint_query.dtype)
    image = attn.to_out[0](out[:, local_text:])
    if len(attn.to_out) > 1:
        image = attn.to_out[1](image)  # dropout
    return image, attn.to_add_out(out[:, :local_text])


def _plain_layer_norm(norm) -> bool:
    return type(norm) is nn.LayerNorm and not norm.elementwise_affine and not norm._forward_hooks \
        and not norm._forward_pre_hooks


def qwen_block_fusable(block) -> bool:
    """Whether a QwenImageTransformerBlock has LayerNorms without affine under every
    modulation (as diffusers builds it)."""
    return all(_plain_layer_norm(getattr(block, n, None)) for n in ("img_norm1", "img_norm2", "txt_norm1",
                                                                     "txt_norm2"))


def _clip_fp16(x: Tensor) -> Tensor:
    # diffusers clips fp16 residual streams (inf -> the largest finite value)
    return x.clip(-_FP16_MAX, _FP16_MAX) if x.dtype == torch.float16 else x


def qwen_block_forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                       image_rotary_emb=None, joint_attention_kwargs=None, modulate_index=None):
    """diffusers QwenImageTransformerBlock.forward: returns (encoder_hidden_states,
    hidden_states)."""
    batch = temb.shape[0]
    if (modulate_index is not None or getattr(self, "zero_cond_t", False) or temb.dim() != 2
            or hidden_states.shape[0] != batch or encoder_hidden_states.shape[0] != batch):
        # per-token modulation, or streams that diffusers' forward broadcasts against temb
        return type(self).forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                                  image_rotary_emb, joint_attention_kwargs, modulate_index)
    # Each stream's rows: shift, scale, gate for the attention, then for the MLP (views, no copy).
    shift1, scale1, gate1, shift2, scale2, gate2 = self.img_mod(temb).chunk(6, dim=-1)
    c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = self.txt_mod(temb).chunk(6, dim=-1)

    normed = adaln_modulate(hidden_states, shift1, scale1, self.img_norm1.eps)
    normed_ctx = adaln_modulate(encoder_hidden_states, c_shift1, c_scale1, self.txt_norm1.eps)
    attn_output, ctx_attn_output = self.attn(hidden_states=normed, encoder_hidden_states=normed_ctx,
                                             encoder_hidden_states_mask=encoder_hidden_states_mask,
                                             image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))

    hidden_states = gated_residual(hidden_states, gate1, attn_output)
    ctx = gated_residual(encoder_hidden_states, c_gate1, ctx_attn_output)
    normed = adaln_modulate(hidden_states, shift2, scale2, self.img_norm2.eps)
    hidden_states = gated_residual(hidden_states, gate2, self.img_mlp(normed))
    normed_ctx = adaln_modulate(ctx, c_shift2, c_scale2, self.txt_norm2.eps)
    ctx = gated_residual(ctx, c_gate2, self.txt_mlp(normed_ctx))
    return _clip_fp16(ctx), _clip_fp16(hidden_states)


__all__ = ["qk_norm", "qwen_attention_forward", "qwen_block_forward", "qwen_block_fusable", "rotary_tables"]
