"""FLUX joint attention (diffusers ``FluxAttention``, ``Flux2Attention``,
``Flux2ParallelSelfAttention``) on mmfast ops: the 3-axis rotary table (a per-token table:
each token's row holds its 3 axes' angles) applied inside the attention kernel, attention
over the text tokens followed by the image tokens. The per-head q/k RMSNorm runs inside the
attention kernels too (``attention(qk_norm=)``) where one stream's q and k are attended
(single-stream blocks, FLUX.2's parallel blocks, a double-stream block without its text);
double-stream blocks normalise text and image tokens with different weights, so they run
``rms_norm`` first.

Rotary layout. diffusers builds FLUX's table (``FluxPosEmbed``) full width, [T, D], each
axis' angles repeated in place (``repeat_interleave``), and rotates interleaved pairs
(x[2j], x[2j + 1]) by angle j (``apply_rotary_emb(use_real_unbind_dim=-1)``). mmfast's
attention kernels rotate halves (x[j], x[j + D/2]) as they load q and k. Attention scores
do not change when q and k have their head dims permuted alike (v is not permuted), so
moving every pair (x[2j], x[2j + 1]) to (j, j + D/2) turns the interleaved rotation into
the half one with the table ``cos[:, 0::2]``. In double-stream blocks that move is folded
into the copy that concatenates text and image tokens, which diffusers makes anyway, so no
rotary pass is left; in single-stream blocks it is one copy of q and k, in place of the
rotary pass. The table must be of that repeated kind (as every diffusers FLUX model
builds it): only its even columns are read.

The functions take any object with diffusers' attribute names; the processors in
``mmfast.integrations.diffusers.attention_processors`` call them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.ops.activation import swiglu
from mmfast.ops.attention import attention
from mmfast.ops.norm import rms_norm


def plain_head_norm(norm: nn.Module, x: Tensor) -> tuple[Tensor | None, float] | None:
    """(weight, eps) of a torch ``nn.RMSNorm`` over the head dim that mmfast's rms_norm
    computes as torch does; None for anything else (hooked, another class, a weight of
    another dtype: torch's own promotion rules)."""
    if type(norm) is not nn.RMSNorm or norm._forward_hooks or norm._forward_pre_hooks:
        return None
    weight = norm.weight
    if weight is not None and weight.dtype != x.dtype:
        return None
    return weight, norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps


def head_rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(x)`` for a torch ``nn.RMSNorm`` over the head dim, on mmfast's rms_norm.
    Anything else runs as it is (see :func:`plain_head_norm`)."""
    plain = plain_head_norm(norm, x)
    return norm(x) if plain is None else rms_norm(x, *plain)


def half_tables(image_rotary_emb, tokens: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """diffusers' full-width interleaved (cos, sin) [T, D] -> half-width [T, D/2] tables
    for the half layout (see the module docstring). Checks shapes only (no sync)."""
    if not (isinstance(image_rotary_emb, (tuple, list)) and len(image_rotary_emb) == 2):
        raise ValueError("image_rotary_emb: expected a pair (cos, sin) of [T, D] tables as FluxPosEmbed builds "
                         f"them, got {type(image_rotary_emb).__name__}")
    cos, sin = image_rotary_emb
    if not (isinstance(cos, Tensor) and isinstance(sin, Tensor)):
        raise ValueError("image_rotary_emb: expected a pair of Tensors")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[-1] != head_dim or cos.shape[0] != tokens:
        raise ValueError(
            f"image_rotary_emb: expected cos and sin of shape [T, D] = ({tokens}, {head_dim}) (text + image tokens, "
            f"head dim), got {tuple(cos.shape)} and {tuple(sin.shape)}; the rotary axes (axes_dims_rope) must sum "
            f"to the attention head dim {head_dim}")
    return cos[:, 0::2], sin[:, 0::2]


def pairs_to_halves(parts: list[Tensor]) -> Tensor:
    """Concatenate [B, T_i, H, D] along tokens, each head's pairs (x[2j], x[2j + 1])
    moved to (j, j + D/2): one copy, as the concatenation alone would be."""
    moved = [p.unflatten(-1, (-1, 2)).transpose(-1, -2) for p in parts]
    return torch.cat(moved, dim=1).flatten(-2)


def _heads(t: Tensor, head_dim: int) -> Tensor:
    return t.unflatten(-1, (-1, head_dim))


def check_no_parallel_config(processor) -> None:
    if getattr(processor, "_parallel_config", None) is not None:
        raise ValueError("_parallel_config: diffusers' context parallelism is set on an mmfast-patched attention; "
                         "undo the mmfast patch first (mmfast runs sequence parallelism through "
                         "mmfast.patch(..., sequence_parallel=group) where supported)")


def _attend(query_parts, key_parts, value_parts, image_rotary_emb, head_dim: int, qk_norm=None) -> Tensor:
    """Attention of the concatenated parts ([B, T_i, H, D] each, text first), rotated by
    diffusers' FLUX tables when given; returns [B, T, H * D]. ``qk_norm``: the per-head
    RMSNorm of q and k (as ``attention`` takes it), done inside the attention kernels."""
    if image_rotary_emb is None:
        query, key = torch.cat(query_parts, 1), torch.cat(key_parts, 1)
        rotary = None
    else:
        tokens = sum(p.shape[1] for p in query_parts)
        rotary = half_tables(image_rotary_emb, tokens, head_dim)
        query, key = pairs_to_halves(query_parts), pairs_to_halves(key_parts)
        rotary = tuple(t.to(query.device) for t in rotary)  # diffusers moves them too
        if qk_norm is not None:  # the weights' columns move with q's and k's
            qk_norm = (*(None if w is None else w.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten()
                         for w in qk_norm[:2]), qk_norm[2])
    value = value_parts[0] if len(value_parts) == 1 else torch.cat(value_parts, 1)
    return attention(query, key, value, rotary=rotary, qk_norm=qk_norm).flatten(-2)


def _attend_normed(attn, query: Tensor, key: Tensor, value: Tensor, image_rotary_emb) -> Tensor:
    """:func:`_attend` of one stream's q, k, v, their ``attn.norm_q`` / ``attn.norm_k``
    done inside the attention kernels when both are plain RMSNorms with one eps (else
    before it, as diffusers does)."""
    q_norm, k_norm = plain_head_norm(attn.norm_q, query), plain_head_norm(attn.norm_k, key)
    if q_norm is None or k_norm is None or q_norm[1] != k_norm[1] or not q_norm[1] > 0:
        query, key = head_rms_norm(attn.norm_q, query), head_rms_norm(attn.norm_k, key)
        return _attend([query], [key], [value], image_rotary_emb, attn.head_dim)
    return _attend([query], [key], [value], image_rotary_emb, attn.head_dim, (q_norm[0], k_norm[0], q_norm[1]))


def _projections(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None):
    """(q, k, v, text q, text k, text v) as diffusers' ``_get_qkv_projections``."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        text = (None, None, None)
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            text = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return (query, key, value, *text)
    text = (None, None, None)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        text = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states))
    return (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states), *text)


def joint_attention(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None,
                    image_rotary_emb) -> Tensor:
    """The attention of ``FluxAttnProcessor`` / ``Flux2AttnProcessor`` before the output
    projections: [B, Tt + Ti, H * D], text tokens first (image tokens alone without a text
    stream)."""
    query, key, value, text_query, text_key, text_value = _projections(attn, hidden_states, encoder_hidden_states)
    head_dim = attn.head_dim
    query, key, value = _heads(query, head_dim), _heads(key, head_dim), _heads(value, head_dim)
    if attn.added_kv_proj_dim is None or encoder_hidden_states is None:  # one stream: the norms fuse
        return _attend_normed(attn, query, key, value, image_rotary_emb)
    # Two streams, each with its own norms: [D] weights cannot tell them apart in the kernel.
    query, key = head_rms_norm(attn.norm_q, query), head_rms_norm(attn.norm_k, key)
    text_query = head_rms_norm(attn.norm_added_q, _heads(text_query, head_dim))
    text_key = head_rms_norm(attn.norm_added_k, _heads(text_key, head_dim))
    return _attend([text_query, query], [text_key, key], [_heads(text_value, head_dim), value],
                   image_rotary_emb, head_dim)


def flux_attention_forward(processor, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None):
    """diffusers ``FluxAttnProcessor`` (FLUX.1, Kontext) without a mask: returns (image,
    text) outputs after their projections with a text stream, else the attention output
    (no projection: the single-stream blocks project it with their MLP)."""
    check_no_parallel_config(processor)
    out = joint_attention(attn, hidden_states, encoder_hidden_states, image_rotary_emb).to(hidden_states.dtype)
    if encoder_hidden_states is None:
        return out
    text_tokens = encoder_hidden_states.shape[1]
    image = attn.to_out[1](attn.to_out[0](out[:, text_tokens:]))
    return image, attn.to_add_out(out[:, :text_tokens])


def flux2_attention_forward(processor, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None):
    """diffusers ``Flux2AttnProcessor`` without a mask: the image output always goes
    through ``to_out``; returns (image, text) with a text stream."""
    check_no_parallel_config(processor)
    out = joint_attention(attn, hidden_states, encoder_hidden_states, image_rotary_emb).to(hidden_states.dtype)
    text = None
    if encoder_hidden_states is not None:
        text_tokens = encoder_hidden_states.shape[1]
        text = attn.to_add_out(out[:, :text_tokens])
        out = out[:, text_tokens:]
    image = attn.to_out[1](attn.to_out[0](out))
    return image if text is None else (image, text)


def split_linear(linear: nn.Module, first: Tensor, second: Tensor) -> Tensor:
    """``linear(torch.cat([first, second], -1))`` without the concatenation: two GEMMs
    over the two column blocks of the weight, the second accumulating into the first's
    output (addmm, in place). A Linear that is not a plain ``nn.Linear`` (LoRA, hooks)
    gets the concatenation."""
    if type(linear) is not nn.Linear or linear._forward_hooks or linear._forward_pre_hooks:
        return linear(torch.cat([first, second], dim=-1))
    width = first.shape[-1]
    weight = linear.weight
    out = F.linear(first, weight[:, :width], linear.bias)
    flat = out.view(-1, out.shape[-1])
    flat.addmm_(second.reshape(-1, second.shape[-1]), weight[:, width:].t())
    return out


def flux2_parallel_attention_forward(processor, attn, hidden_states, image_rotary_emb=None):
    """diffusers ``Flux2ParallelSelfAttnProcessor`` without a mask: one input projection
    to q, k, v and the SwiGLU MLP's gate and up; attention and MLP in parallel; one output
    projection over both, run as two accumulating GEMMs (no concatenation)."""
    check_no_parallel_config(processor)
    projected = attn.to_qkv_mlp_proj(hidden_states)
    qkv_dim = 3 * attn.inner_dim
    mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
    local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)  # diffusers' split rule
    qkv, mlp = projected[..., :local_qkv], projected[..., local_qkv:]
    query, key, value = (_heads(t, attn.head_dim) for t in qkv.chunk(3, dim=-1))
    out = _attend_normed(attn, query, key, value, image_rotary_emb).to(hidden_states.dtype)
    if type(attn.mlp_act_fn).__name__ == "Flux2SwiGLU":
        half = mlp.shape[-1] // 2
        mlp = swiglu(mlp[..., :half], mlp[..., half:])  # two views: no copy of the halves
    else:
        mlp = attn.mlp_act_fn(mlp)
    return split_linear(attn.to_out, out, mlp)


__all__ = ["check_no_parallel_config", "flux2_attention_forward", "flux2_parallel_attention_forward",
           "flux_attention_forward", "half_tables", "head_rms_norm", "joint_attention", "pairs_to_halves",
           "plain_head_norm", "split_linear"]
