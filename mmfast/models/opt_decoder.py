"""The OPT decoder (Meta's OPT, BLIP-2's language model) on mmfast ops.

Works on a packed token stream like :class:`~mmfast.models.qwen2_decoder.Qwen2Decoder`:
``inputs_embeds`` [T, W] holds B sequences one after another (``cu_seqlens`` int32
[B+1]), so prompts of different lengths need no padding, and a
:class:`~mmfast.models.kv_cache.KVCache` makes it incremental.

    embeddings  inputs_embeds (W = word_embed_proj_dim) -> ``project_in`` when W differs
                from the width C, + ``embed_positions[position + 2]`` (OPT's learned table
                starts at row 2, a relic of fairseq's padding index)
    per layer   pre-LN (``do_layer_norm_before``, every OPT but 350m):
                    h += attn(ln1(h)); h += fc2(relu(fc1(ln2(h))))
                post-LN (OPT-350m):
                    h = ln1(h + attn(h)); h = ln2(h + fc2(relu(fc1(h))))
                attention: biased q/k/v/out_proj, causal :func:`mmfast.ops.attention`
    output      ``final_layer_norm`` (pre-LN only) -> ``project_out`` when W differs

Every residual add rides in a fused :func:`mmfast.ops.layer_norm` (the embeddings + positions
sum in the first layer's norm). Position ids are each token's index within its sequence,
padding not counted: what Hugging Face's OPT derives from the attention mask.

In training mode the hidden-state dropout (``dropout``) runs as in Hugging Face, and so does
the attention-probability dropout (``attention_dropout``), inside the attention kernels
(torch's default generator; the masks are not Hugging Face's). LayerDrop (0 in every
released OPT) is not implemented.

State dict names equal Hugging Face's ``OPTDecoder`` (``embed_tokens``, ``embed_positions``,
``layers.i.self_attn.q_proj`` ..., ``final_layer_norm``, ``project_in``/``project_out``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.models.kv_cache import CacheStep, KVCache
from mmfast.nn.activation import activation_module
from mmfast.nn.norm import LayerNorm
from mmfast.ops.attention import attention

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2


def causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                     cache: Optional[KVCache] = None, step: Optional[CacheStep] = None, layer: int = 0,
                     dropout_p: float = 0.0) -> Tensor:
    """Causal attention of a packed stream q, k, v [T, H, D]; with ``cache``, k and v are
    appended to it first and the queries attend to everything cached before them.
    ``dropout_p``: attention-probability dropout (the caller passes 0 outside training)."""
    if cache is None:
        return attention(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                         max_seqlen_k=max_seqlen, causal=True, dropout_p=dropout_p)
    return cache.attend(layer, step, q, k, v, cu_seqlens, max_seqlen, dropout_p)


class OPTAttention(nn.Module):
    """Multi-head causal self-attention with biased projections over a packed stream;
    in training mode the probabilities are dropped with ``attention_dropout``."""

    def __init__(self, hidden_size: int, num_heads: int, bias: bool = True, attention_dropout: float = 0.0):
        super().__init__()
        self.attention_dropout = attention_dropout
        if hidden_size % num_heads:
            raise ValueError(f"num_attention_heads: {num_heads} does not divide hidden_size {hidden_size}")
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, cache: Optional[KVCache] = None,
                step: Optional[CacheStep] = None, layer: int = 0) -> Tensor:
        heads = (self.num_heads, self.head_dim)
        q, k, v = (proj(x).unflatten(-1, heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        dropout_p = self.attention_dropout if self.training else 0.0
        out = causal_attention(q, k, v, cu_seqlens, max_seqlen, cache, step, layer, dropout_p)
        return self.out_proj(out.flatten(-2))


class OPTDecoderLayer(nn.Module):
    """One block. ``forward(x, residual, ...)`` reads the hidden state as ``x + residual``
    (``residual`` None: ``x``) and returns it the same way, unsummed, so the next norm
    does the add (pre-LN returns ``(mlp_out, stream)``, post-LN ``(hidden, None)``)."""

    def __init__(self, hidden_size: int, num_heads: int, ffn_dim: int, *, norm_before: bool = True,
                 bias: bool = True, elementwise_affine: bool = True, activation: str = "relu",
                 dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        self.norm_before, self.dropout = norm_before, dropout
        self.self_attn = OPTAttention(hidden_size, num_heads, bias, attention_dropout)
        self.self_attn_layer_norm = LayerNorm(hidden_size, elementwise_affine=elementwise_affine)
        self.fc1 = nn.Linear(hidden_size, ffn_dim, bias=bias)
        self.activation_fn = nn.ReLU() if activation == "relu" else activation_module(activation)
        self.fc2 = nn.Linear(ffn_dim, hidden_size, bias=bias)
        self.final_layer_norm = LayerNorm(hidden_size, elementwise_affine=elementwise_affine)

    def _mlp(self, x: Tensor) -> Tensor:
        return F.dropout(self.fc2(self.activation_fn(self.fc1(x))), self.dropout, self.training)

    def _attn(self, x: Tensor, *args) -> Tensor:
        return F.dropout(self.self_attn(x, *args), self.dropout, self.training)

    def forward(self, x, residual, cu_seqlens, max_seqlen, cache=None, step=None, layer=0):
        attn_args = (cu_seqlens, max_seqlen, cache, step, layer)
        if self.norm_before:
            normed, stream = (self.self_attn_layer_norm(x), x) if residual is None else \
                self.self_attn_layer_norm(x, residual=residual)
            normed, stream = self.final_layer_norm(self._attn(normed, *attn_args), residual=stream)
            return self._mlp(normed), stream
        hidden = x if residual is None else x + residual
        hidden, _ = self.self_attn_layer_norm(self._attn(hidden, *attn_args), residual=hidden)
        hidden, _ = self.final_layer_norm(self._mlp(hidden), residual=hidden)
        return hidden, None


class OPTDecoder(nn.Module):
    """Embeddings + decoder layers + final norm and projections (no lm_head: the caller
    applies it to the positions it needs). Defaults: OPT-2.7B."""

    def __init__(self, *, vocab_size: int = 50272, hidden_size: int = 2560, ffn_dim: int = 10240,
                 num_hidden_layers: int = 32, num_attention_heads: int = 32, max_position_embeddings: int = 2048,
                 word_embed_proj_dim: Optional[int] = None, do_layer_norm_before: bool = True,
                 remove_final_layer_norm: bool = False, enable_bias: bool = True,
                 layer_norm_elementwise_affine: bool = True, activation_function: str = "relu",
                 dropout: float = 0.0, attention_dropout: float = 0.0, pad_token_id: Optional[int] = 1):
        super().__init__()
        width = word_embed_proj_dim or hidden_size
        self.hidden_size, self.word_embed_proj_dim = hidden_size, width
        self.num_heads, self.head_dim = num_attention_heads, hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.embed_tokens = nn.Embedding(vocab_size, width, padding_idx=pad_token_id)
        self.embed_positions = nn.Embedding(max_position_embeddings + POSITION_OFFSET, hidden_size)
        self.project_in = nn.Linear(width, hidden_size, bias=False) if width != hidden_size else None
        self.project_out = nn.Linear(hidden_size, width, bias=False) if width != hidden_size else None
        self.layers = nn.ModuleList([
            OPTDecoderLayer(hidden_size, num_attention_heads, ffn_dim, norm_before=do_layer_norm_before,
                            bias=enable_bias, elementwise_affine=layer_norm_elementwise_affine,
                            activation=activation_function, dropout=dropout, attention_dropout=attention_dropout)
            for _ in range(num_hidden_layers)])
        keep_final = do_layer_norm_before and not remove_final_layer_norm
        self.final_layer_norm = (LayerNorm(hidden_size, elementwise_affine=layer_norm_elementwise_affine)
                                 if keep_final else None)

    def new_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        weight = self.embed_positions.weight
        return KVCache(len(self.layers), batch, capacity, self.num_heads, self.head_dim,
                       dtype=dtype or weight.dtype, device=weight.device)

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                cache: Optional[KVCache] = None, new_lengths: Optional[Sequence[int]] = None) -> Tensor:
        """Final hidden states [T, W] of the packed stream ``inputs_embeds`` [T, W] whose
        tokens sit at ``position_ids`` [T] (0-based, below ``max_position_embeddings``: not
        checked here, that would sync; the callers check with the lengths they know). With
        ``cache``, the stream holds ``new_lengths[b]`` new tokens of each sequence b, which
        are appended to it and attend to everything cached before them."""
        if inputs_embeds.dim() != 2 or inputs_embeds.shape[-1] != self.word_embed_proj_dim:
            raise ValueError(f"inputs_embeds: expected packed [T, {self.word_embed_proj_dim}], "
                             f"got {tuple(inputs_embeds.shape)}")
        if position_ids.shape != inputs_embeds.shape[:1]:
            raise ValueError(f"position_ids: expected [{inputs_embeds.shape[0]}], got {tuple(position_ids.shape)}")
        if cache is not None and new_lengths is None:
            raise ValueError("new_lengths: required with a cache (the new tokens of each sequence)")
        step = cache.plan(new_lengths) if cache is not None else None
        x = inputs_embeds if self.project_in is None else self.project_in(inputs_embeds)
        residual = self.embed_positions(position_ids + POSITION_OFFSET).to(x.dtype)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cu_seqlens, max_seqlen, cache, step, i)
        if cache is not None:
            cache.advance(step)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x) if residual is None else self.final_layer_norm(x, residual=residual)[0]
        elif residual is not None:
            x = x + residual
        return x if self.project_out is None else self.project_out(x)
