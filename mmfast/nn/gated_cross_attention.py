"""Tanh-gated cross-attention block (Flamingo / Llama 3.2 Vision), state_dict-compatible
with Hugging Face's MllamaCrossAttentionDecoderLayer:

    h = x + tanh(attn_gate) * o_proj(cross_attention(q_norm(q_proj(norm(x))), k_norm(k_proj(img)), v_proj(img)))
    y = h + tanh(mlp_gate) * sees_any * mlp(post_norm(h))

The attention gate rides in the attention kernel's epilogue (o_proj has no bias, so
tanh(g) * o_proj(a) = o_proj(tanh(g) * a)) and the residual in the output GEMM (addmm).
``sees_any`` zeroes the MLP branch of text tokens that see no image, as Mllama does.
In training mode the attention probabilities are dropped with ``cross_attn.dropout``
(Mllama's config ``dropout``; inside the kernel, from torch's default generator).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.nn.norm import RMSNorm
from mmfast.ops.cross_attention import cross_attention


class CrossAttention(nn.Module):
    """Mllama's text-to-image attention projections (q_norm and k_norm per head)."""

    def __init__(self, hidden_size: int, heads: int, kv_heads: int, eps: float, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.num_key_value_heads = heads, kv_heads
        self.dropout = dropout  # attention-probability dropout, in training mode (Mllama's name)
        self.head_dim = hidden_size // heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)


def project_image(attn: nn.Module, image_states):
    """(k, v) [B, Ti, Hk, D] of ``attn`` (ours, or Hugging Face's MllamaTextCrossAttention)."""
    batch, tokens, _ = image_states.shape
    shape = (batch, tokens, attn.num_key_value_heads, attn.head_dim)
    return attn.k_norm(attn.k_proj(image_states).view(shape)), attn.v_proj(image_states).view(shape)


def gated_cross_attention_forward(layer: nn.Module, x, k, v, mask=None, sees_any=None):
    """The block's math on ``layer`` (ours, or Hugging Face's MllamaCrossAttentionDecoderLayer,
    whose submodule names are the same)."""
    attn = layer.cross_attn
    batch, tokens, _ = x.shape
    q = attn.q_proj(layer.input_layernorm(x)).view(batch, tokens, attn.num_heads, attn.head_dim)
    dropout_p = attn.dropout if attn.training else 0.0
    a = cross_attention(attn.q_norm(q), k, v, mask=mask, gate=layer.cross_attn_attn_gate, scale=attn.scaling,
                        dropout_p=dropout_p)
    h = torch.addmm(x.reshape(batch * tokens, -1), a.reshape(batch * tokens, -1), attn.o_proj.weight.t())
    h = h.view_as(x)
    mlp = layer.mlp(layer.post_attention_layernorm(h))
    if sees_any is not None:
        mlp = sees_any * mlp
    return h + layer.cross_attn_mlp_gate.tanh() * mlp


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GatedCrossAttentionBlock(nn.Module):
    """``forward(x [B, T, C], image_states [B, Ti, C], mask=None, sees_any=None)``.

    ``mask``: an image mask of mmfast.ops.cross_attention_masks (e.g.
    ImagesUpToPositionMask); ``sees_any``: [B, T, 1] 0/1 factor for the MLP branch (Mllama's
    full_text_row_masked_out_mask), or None. Also accepts precomputed ``kv=(k, v)``
    ([B, Ti, Hk, D] each) instead of image_states, as a cache would hold them.
    """

    def __init__(self, hidden_size: int, heads: int, kv_heads: int, intermediate_size: int, eps: float = 1e-5,
                 dropout: float = 0.0):
        super().__init__()
        self.cross_attn = CrossAttention(hidden_size, heads, kv_heads, eps, dropout)
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = GatedMLP(hidden_size, intermediate_size)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    @classmethod
    def from_config(cls, config) -> "GatedCrossAttentionBlock":
        """From a Hugging Face MllamaTextConfig."""
        return cls(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                   config.intermediate_size, config.rms_norm_eps, getattr(config, "dropout", 0.0))

    def forward(self, x, image_states=None, mask=None, sees_any=None, kv=None):
        k, v = kv if kv is not None else project_image(self.cross_attn, image_states)
        return gated_cross_attention_forward(self, x, k, v, mask, sees_any)
