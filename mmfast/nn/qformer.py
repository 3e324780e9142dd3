"""BLIP-2's Q-Former: learned query embeddings (+ optional text tokens) through BERT-style
layers: self-attention over all tokens, cross-attention from the queries to the image
features every ``cross_attention_frequency`` layers, post-LayerNorms, and a separate FFN
for the queries (``intermediate_query``/``output_query``) and for the text.

:class:`QFormer` is state_dict-compatible with Hugging Face's Blip2QFormerModel (the
learned ``query_tokens`` live in Blip2Model, outside it, as there). The forward math,
:func:`qformer_forward`, reads only submodule names that both share, so ``mmfast.patch``
runs it on a Hugging Face instance too. Attention runs mmfast's cross_attention (padding
masks as KeyPaddingMask, never a dense mask); each residual add rides in mmfast's fused
LayerNorm. In training mode the attention probabilities are dropped with
``attention_probs_dropout_prob`` (each attention module's ``attention_dropout``, as Hugging
Face names it) inside the attention kernels, from torch's default generator (seed it
with ``torch.manual_seed`` for a reproducible step; the masks are not Hugging Face's);
in eval mode nothing is dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfast.nn.projector import activation
from mmfast.ops.cross_attention import cross_attention
from mmfast.ops.cross_attention_masks import KeyPaddingMask
from mmfast.ops.norm import layer_norm

# ---- the forward math, on any module tree with Hugging Face's names ---------------------


def _padding_mask(attention_mask):
    return None if attention_mask is None else KeyPaddingMask(key_valid=attention_mask.bool())


def _attend(attn: nn.Module, heads: int, x, context, mask):
    """Multi-head attention of x over context with ``attn.{query,key,value}``; in training,
    probabilities dropped with ``attn.attention_dropout``."""
    batch, tokens, _ = x.shape
    q = attn.query(x).view(batch, tokens, heads, -1)
    k = attn.key(context).view(batch, context.shape[1], heads, -1)
    v = attn.value(context).view(batch, context.shape[1], heads, -1)
    dropout_p = attn.attention_dropout if attn.training else 0.0
    return cross_attention(q, k, v, mask=mask, dropout_p=dropout_p).reshape(batch, tokens, -1)


def _add_norm(output: nn.Module, x, residual):
    """``output.LayerNorm(dropout(output.dense(x)) + residual)``, the add fused in the norm."""
    norm = output.LayerNorm
    y = output.dropout(output.dense(x))
    return layer_norm(y, norm.weight, norm.bias, norm.eps, residual=residual)[0]


def _attention_block(block: nn.Module, heads: int, x, context, mask):
    return _add_norm(block.output, _attend(block.attention, heads, x, context, mask), x)


def _feed_forward(intermediate: nn.Module, output: nn.Module, x):
    return _add_norm(output, intermediate.intermediate_act_fn(intermediate.dense(x)), x)


def qformer_forward(model: nn.Module, heads: int, query_embeds, query_length=None, attention_mask=None,
                    encoder_hidden_states=None, encoder_attention_mask=None):
    """Q-Former math on ``model`` (ours or Blip2QFormerModel). ``query_embeds`` [B, T, C]
    holds the queries, then optional text tokens (``query_length`` says how many queries);
    ``attention_mask`` [B, T] and ``encoder_attention_mask`` [B, Ti]: 1 = real token.
    Returns the last hidden state [B, T, C]."""
    query_length = query_embeds.shape[1] if query_length is None else query_length
    x = model.layernorm(query_embeds.to(model.layernorm.weight.dtype))
    x = model.dropout(x)
    if encoder_hidden_states is not None:
        encoder_hidden_states = encoder_hidden_states.to(x.dtype)
    self_mask = _padding_mask(attention_mask)
    image_mask = _padding_mask(encoder_attention_mask)
    for layer in model.encoder.layer:
        x = _attention_block(layer.attention, heads, x, x, self_mask)
        if query_length == 0:
            x = _feed_forward(layer.intermediate, layer.output, x)
            continue
        queries = x[:, :query_length]
        if layer.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError("encoder_hidden_states: needed by the cross-attention layers")
            queries = _attention_block(layer.crossattention, heads, queries, encoder_hidden_states, image_mask)
        queries = _feed_forward(layer.intermediate_query, layer.output_query, queries)
        if x.shape[1] > query_length:
            text = _feed_forward(layer.intermediate, layer.output, x[:, query_length:])
            queries = torch.cat([queries, text], dim=1)
        x = queries
    return x


# ---- the modules (Hugging Face's names, so that state_dicts match) ---------------------


class QFormerMultiHeadAttention(nn.Module):
    def __init__(self, hidden_size: int, context_size: int, attention_dropout: float = 0.0):
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(context_size, hidden_size)
        self.value = nn.Linear(context_size, hidden_size)
        self.attention_dropout = attention_dropout  # probability dropout, in training mode


class QFormerOutput(nn.Module):
    def __init__(self, in_features: int, hidden_size: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)


class QFormerAttention(nn.Module):
    def __init__(self, hidden_size: int, context_size: int, eps: float, dropout: float, attention_dropout: float):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(hidden_size, context_size, attention_dropout)
        self.output = QFormerOutput(hidden_size, hidden_size, eps, dropout)


class QFormerIntermediate(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.intermediate_act_fn = activation(act)


class QFormerLayer(nn.Module):
    def __init__(self, config, index: int):
        super().__init__()
        c, eps, p = config.hidden_size, config.layer_norm_eps, config.hidden_dropout_prob
        p_attn = getattr(config, "attention_probs_dropout_prob", 0.0)
        self.attention = QFormerAttention(c, c, eps, p, p_attn)
        self.has_cross_attention = index % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(c, config.encoder_hidden_size, eps, p, p_attn)
        if config.use_qformer_text_input:
            self.intermediate = QFormerIntermediate(c, config.intermediate_size, config.hidden_act)
            self.output = QFormerOutput(config.intermediate_size, c, eps, p)
        self.intermediate_query = QFormerIntermediate(c, config.intermediate_size, config.hidden_act)
        self.output_query = QFormerOutput(config.intermediate_size, c, eps, p)


class QFormerEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_hidden_layers))


class QFormer(nn.Module):
    """``forward(query_embeds, encoder_hidden_states, encoder_attention_mask=None,
    query_length=None, attention_mask=None)`` -> last hidden state [B, T, C].

    Built from a Hugging Face Blip2QFormerConfig (or any object with its fields:
    hidden_size, num_attention_heads, intermediate_size, hidden_act, layer_norm_eps,
    hidden_dropout_prob, cross_attention_frequency, encoder_hidden_size,
    num_hidden_layers, use_qformer_text_input; attention_probs_dropout_prob, 0 when absent).
    Dropout (hidden and attention-probability) acts in training mode only.
    """

    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = QFormerEncoder(config)

    def forward(self, query_embeds, encoder_hidden_states=None, encoder_attention_mask=None,
                query_length=None, attention_mask=None):
        return qformer_forward(self, self.heads, query_embeds, query_length, attention_mask,
                               encoder_hidden_states, encoder_attention_mask)
