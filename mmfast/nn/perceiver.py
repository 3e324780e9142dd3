"""Idefics2's perceiver resampler: learned latents attend to concat(image tokens, latents)
with grouped K/V heads, a few layers, RMSNorms and a SwiGLU MLP. state_dict-compatible
with Hugging Face's Idefics2PerceiverResampler (``latents``, ``layers.N.*``, ``norm``).
In training mode the attention probabilities are dropped with ``attention_dropout`` (as
Hugging Face does; inside the kernels, from torch's default generator)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.nn.norm import RMSNorm
from mmfast.ops.cross_attention import cross_attention
from mmfast.ops.cross_attention_masks import KeyPaddingMask


class PerceiverAttention(nn.Module):
    """Latents [B, L, C] over concat(context [B, T, C], latents); no output bias."""

    def __init__(self, hidden_size: int, heads: int, head_dim: int, kv_heads: int, attention_dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim, self.kv_heads = heads, head_dim, kv_heads
        self.attention_dropout = attention_dropout  # probability dropout, in training mode
        self.q_proj = nn.Linear(hidden_size, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden_size, bias=False)

    def forward(self, latents, context, mask=None, residual=None):
        return perceiver_attention(self, self.heads, self.kv_heads, self.head_dim, latents, context, mask, residual)


def perceiver_attention(proj: nn.Module, heads: int, kv_heads: int, head_dim: int, latents, context,
                        mask=None, residual=None):
    """The attention of a perceiver layer whose projections are ``proj.{q,k,v,o}_proj``
    (ours, or Hugging Face's Idefics2PerceiverAttention when patched); plus ``residual``.
    In training, probabilities are dropped with ``proj.attention_dropout``."""
    batch, n_latents, _ = latents.shape
    both = torch.cat([context, latents], dim=1)
    q = proj.q_proj(latents).view(batch, n_latents, heads, head_dim)
    k = proj.k_proj(both).view(batch, both.shape[1], kv_heads, head_dim)
    v = proj.v_proj(both).view(batch, both.shape[1], kv_heads, head_dim)
    dropout_p = proj.attention_dropout if proj.training else 0.0
    attn = cross_attention(q, k, v, mask=mask, dropout_p=dropout_p).reshape(batch * n_latents, -1)
    if residual is None:
        return proj.o_proj(attn).view(batch, n_latents, -1)
    # The residual add rides on the output GEMM (addmm's beta term).
    flat = torch.addmm(residual.reshape(batch * n_latents, -1), attn, proj.o_proj.weight.t())
    return flat.view_as(residual)


def context_mask(attention_mask, batch: int, n_latents: int):
    """Keys are concat(context, latents): padded context tokens unseen, latents always seen."""
    if attention_mask is None:
        return None
    valid = torch.cat([attention_mask.bool(), attention_mask.new_ones(batch, n_latents, dtype=torch.bool)], 1)
    return KeyPaddingMask(key_valid=valid)


class PerceiverMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PerceiverLayer(nn.Module):
    def __init__(self, hidden_size: int, heads: int, head_dim: int, kv_heads: int, eps: float,
                 attention_dropout: float = 0.0):
        super().__init__()
        self.input_latents_norm = RMSNorm(hidden_size, eps)
        self.input_context_norm = RMSNorm(hidden_size, eps)
        self.self_attn = PerceiverAttention(hidden_size, heads, head_dim, kv_heads, attention_dropout)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = PerceiverMLP(hidden_size, 4 * hidden_size)

    def forward(self, latents, context, mask=None):
        latents = self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context),
                                 mask, residual=latents)
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    """``forward(context [B, T, C], attention_mask=None [B, T] bool/int, 1 = real token)``
    -> [B, n_latents, C]. Latents always see each other; padded context tokens are never
    seen (a :class:`KeyPaddingMask` over the keys, no dense mask)."""

    def __init__(self, hidden_size: int, n_latents: int = 64, depth: int = 3, heads: int = 16,
                 head_dim: int = 96, kv_heads: int = 4, eps: float = 1e-6, attention_dropout: float = 0.0):
        super().__init__()
        self.latents = nn.Parameter(torch.ones(n_latents, hidden_size))
        self.layers = nn.ModuleList(PerceiverLayer(hidden_size, heads, head_dim, kv_heads, eps, attention_dropout)
                                    for _ in range(depth))
        self.norm = RMSNorm(hidden_size, eps)

    @classmethod
    def from_config(cls, config) -> "PerceiverResampler":
        """From a Hugging Face Idefics2PerceiverConfig."""
        return cls(config.hidden_size, config.resampler_n_latents, config.resampler_depth,
                   config.resampler_n_heads, config.resampler_head_dim, config.num_key_value_heads,
                   config.rms_norm_eps, getattr(config, "attention_dropout", 0.0))

    def forward(self, context, attention_mask=None):
        batch = context.shape[0]
        latents = self.latents.unsqueeze(0).expand(batch, -1, -1)
        mask = context_mask(attention_mask, batch, latents.shape[1])
        for layer in self.layers:
            latents = layer(latents, context, mask)
        return self.norm(latents)
