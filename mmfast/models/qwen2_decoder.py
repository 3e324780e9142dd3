"""The Qwen2 decoder of Qwen2.5-VL (and Qwen2-VL) on mmfast ops.

Works on a packed token stream: ``inputs_embeds`` [T, C] holding B sequences one after
another (``cu_seqlens`` int32 [B+1]), so prompts of different lengths need no padding.
Per layer: RMSNorm (the residual add fused in) -> GQA attention (q/k/v projections with
bias, M-RoPE, causal :func:`mmfast.ops.attention`; without a cache the rotation happens inside
the attention kernels, with one it goes through :func:`mmfast.ops.apply_rotary` so the cache holds
rotated keys)
-> RMSNorm -> SwiGLU MLP (:func:`mmfast.ops.swiglu`). A :class:`~mmfast.models.kv_cache.KVCache`
makes it incremental.

M-RoPE (multimodal rotary): every token has three position ids (t, h, w) [3, T]. Rotary
pair j of a head takes its angle from stream 0 for the first ``mrope_section[0]`` pairs,
stream 1 for the next ``mrope_section[1]``, stream 2 for the last ``mrope_section[2]``
(sum = head_dim / 2), as Hugging Face's ``apply_multimodal_rotary_pos_emb`` does. Text
tokens carry equal ids in the three streams, which gives plain 1D RoPE.

Qwen3 (the language model of Qwen3-VL) differs in three switches: ``qk_norm`` (an
RMSNorm over each head of q and of k, ``self_attn.q_norm`` / ``k_norm``, before the
rotation, which still happens inside the attention kernels), ``head_dim`` given apart
from hidden_size / heads, and ``mrope_interleaved`` (pair j takes stream 1 (h) when
j % 3 == 1 and j < 3 * mrope_section[1], stream 2 (w) when j % 3 == 2 and
j < 3 * mrope_section[2], else stream 0 (t), as Qwen3-VL's rotary does); plus DeepStack:
``forward(..., deepstack=[(index, features), ...])`` adds features[i] [n, C] to the hidden
states of the tokens at ``index`` [n] after layer i, for the first len(features) layers.

State dict names equal Hugging Face's ``Qwen2_5_VLTextModel`` (``embed_tokens``,
``layers.i.self_attn.q_proj`` ..., ``norm``) and ``Qwen3VLTextModel``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from mmfast.models.kv_cache import CacheStep, KVCache
from mmfast.nn.norm import RMSNorm
from mmfast.ops.activation import swiglu
from mmfast.ops.attention import attention
from mmfast.ops.rotary import apply_rotary


def mrope_cos_sin(position_ids: Tensor, inv_freq: Tensor, mrope_section: Sequence[int],
                  interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Half-width rotary tables [T, D/2] (float32) for position ids [3, T]: pair j's angle
    is position_ids[s(j)] * inv_freq[j], s(j) the stream whose section holds j (contiguous
    sections, or with ``interleaved`` Qwen3-VL's t, h, w, t, h, w, ... pattern)."""
    if sum(mrope_section) != inv_freq.numel():
        raise ValueError(f"mrope_section: {list(mrope_section)} must sum to head_dim / 2 = {inv_freq.numel()}")
    # Built on the device: no host-to-device copy, no sync.
    if interleaved:
        pair = torch.arange(inv_freq.numel(), device=inv_freq.device)
        stream = torch.where((pair % 3 == 1) & (pair < 3 * mrope_section[1]), 1, 0)
        stream = torch.where((pair % 3 == 2) & (pair < 3 * mrope_section[2]), 2, stream)
    else:
        stream = torch.cat([torch.full((size,), s, dtype=torch.long, device=inv_freq.device)
                            for s, size in enumerate(mrope_section)])
    positions = position_ids.float().index_select(0, stream).T  # [T, D/2]: each pair's position
    angles = positions * inv_freq.float()
    return angles.cos(), angles.sin()


def rope_inv_freq(head_dim: int, theta: float, device=None) -> Tensor:
    """1 / theta^(2i / D) in float32, computed as Hugging Face does. Built on ``device`` at
    every forward rather than kept as a buffer: a buffer would follow ``model.to(bfloat16)``
    and lose the precision the angles need, and device-side creation keeps the forward
    free of host-to-device copies (CUDA-graph capturable)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


class Qwen2Attention(nn.Module):
    """GQA self-attention with M-RoPE over a packed stream, causal, optionally cached."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, qkv_bias: bool = True,
                 o_bias: bool = False, head_dim: Optional[int] = None, qk_norm_eps: Optional[float] = None):
        super().__init__()
        if (head_dim is None and hidden_size % num_heads) or num_heads % num_kv_heads:
            raise ValueError(f"num_heads: {num_heads} must divide hidden_size {hidden_size} (or give head_dim), "
                             f"and num_key_value_heads {num_kv_heads} must divide it")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if qk_norm_eps is not None:  # Qwen3: per-head RMSNorm of q and k, before the rotation
            self.q_norm = RMSNorm(self.head_dim, eps=qk_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=qk_norm_eps)
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=o_bias)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], cu_seqlens: Tensor, max_seqlen: int,
                cache: Optional[KVCache] = None, step: Optional[CacheStep] = None, layer: int = 0) -> Tensor:
        d = self.head_dim
        q = self.q_proj(x).unflatten(-1, (self.num_heads, d))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, d))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, d))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is None:  # q and k over the same tokens: the Triton kernels rotate them as they load them
            out = attention(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                            max_seqlen_k=max_seqlen, causal=True, rotary=rotary)
        else:  # the cache holds rotated keys
            q, k = apply_rotary(q, k, *rotary)
            out = cache.attend(layer, step, q, k, v, cu_seqlens, max_seqlen)
        return self.o_proj(out.flatten(-2))


class Qwen2MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm block. ``forward(x, residual, ...)`` reads the residual stream as
    ``x + residual`` (``residual`` None: ``x``) and returns ``(mlp_out, stream)``: the adds
    happen inside the fused norms."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int,
                 eps: float, qkv_bias: bool = True, o_bias: bool = False, head_dim: Optional[int] = None,
                 qk_norm: bool = False):
        super().__init__()
        self.self_attn = Qwen2Attention(hidden_size, num_heads, num_kv_heads, qkv_bias, o_bias, head_dim,
                                        eps if qk_norm else None)
        self.mlp = Qwen2MLP(hidden_size, intermediate_size)
        self.input_layernorm = RMSNorm(hidden_size, eps=eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps=eps)

    def forward(self, x, residual, rotary, cu_seqlens, max_seqlen, cache=None, step=None, layer=0):
        if residual is None:
            normed, stream = self.input_layernorm(x), x
        else:
            normed, stream = self.input_layernorm(x, residual=residual)
        attn = self.self_attn(normed, rotary, cu_seqlens, max_seqlen, cache, step, layer)
        normed, stream = self.post_attention_layernorm(attn, residual=stream)
        return self.mlp(normed), stream


class Qwen2Decoder(nn.Module):
    """Embedding + decoder layers + final norm (no lm_head: the caller applies it to the
    positions it needs). Defaults: Qwen2.5-VL-7B's language model.

    Also a Llama decoder (as LLaVA uses): ``qkv_bias=False`` (Llama with ``attention_bias``:
    both flags True), and 1D RoPE by giving the three position streams equal ids."""

    def __init__(self, *, vocab_size: int = 152064, hidden_size: int = 3584, intermediate_size: int = 18944,
                 num_hidden_layers: int = 28, num_attention_heads: int = 28, num_key_value_heads: int = 4,
                 rms_norm_eps: float = 1e-6, rope_theta: float = 1000000.0,
                 mrope_section: Sequence[int] = (16, 24, 24), qkv_bias: bool = True, o_bias: bool = False,
                 head_dim: Optional[int] = None, qk_norm: bool = False, mrope_interleaved: bool = False):
        super().__init__()
        self.hidden_size, self.num_kv_heads = hidden_size, num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else int(head_dim)
        self.mrope_section = tuple(int(s) for s in mrope_section)
        self.mrope_interleaved = bool(mrope_interleaved)
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList([
            Qwen2DecoderLayer(hidden_size, num_attention_heads, num_key_value_heads, intermediate_size, rms_norm_eps,
                              qkv_bias, o_bias, head_dim, qk_norm)
            for _ in range(num_hidden_layers)])
        self.norm = RMSNorm(hidden_size, eps=rms_norm_eps)
        self.rope_theta = float(rope_theta)
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section: {list(self.mrope_section)} must sum to "
                             f"head_dim / 2 = {self.head_dim // 2}")

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        weight = self.embed_tokens.weight
        return KVCache(len(self.layers), batch, capacity, self.num_kv_heads, self.head_dim,
                       dtype=dtype or weight.dtype, device=weight.device)

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                cache: Optional[KVCache] = None, new_lengths: Optional[Sequence[int]] = None,
                deepstack: Optional[Sequence[tuple[Tensor, Sequence[Tensor]]]] = None) -> Tensor:
        """Final hidden states [T, C] of the packed stream ``inputs_embeds`` [T, C] with
        M-RoPE ``position_ids`` [3, T]. With ``cache``, the stream holds ``new_lengths[b]``
        new tokens of each sequence b (host ints, the lengths ``cu_seqlens`` describes),
        which are appended to the cache and attend to everything cached before them.
        ``deepstack``: pairs ``(index [n] long, [features of layer 0, layer 1, ...] each
        [n, C])``, added after those layers to the tokens at ``index``."""
        if inputs_embeds.dim() != 2 or inputs_embeds.shape[-1] != self.hidden_size:
            raise ValueError(f"inputs_embeds: expected packed [T, {self.hidden_size}], "
                             f"got {tuple(inputs_embeds.shape)}")
        if position_ids.shape != (3, inputs_embeds.shape[0]):
            raise ValueError(f"position_ids: expected [3, {inputs_embeds.shape[0]}] (t, h, w streams), "
                             f"got {tuple(position_ids.shape)}")
        if cache is not None and new_lengths is None:
            raise ValueError("new_lengths: required with a cache (the new tokens of each sequence)")
        step = cache.plan(new_lengths) if cache is not None else None
        inv_freq = rope_inv_freq(self.head_dim, self.rope_theta, inputs_embeds.device)
        cos, sin = mrope_cos_sin(position_ids, inv_freq, self.mrope_section, self.mrope_interleaved)
        x, residual = inputs_embeds, None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, (cos, sin), cu_seqlens, max_seqlen, cache, step, i)
            for index, features in deepstack or ():
                if i < len(features):  # into the layer's output; the next norm adds the residual
                    x = x.index_add(0, index, features[i].to(x.dtype))
        if cache is not None:
            cache.advance(step)
        return self.norm(x, residual=residual)[0] if residual is not None else self.norm(x)
