"""Adaptive LayerNorms of DiT / SD3 blocks (adaLN-Zero) on ``mmfast.ops.adaln_modulate``,
with diffusers' parameter names (state_dict compatible).

The forward functions run on these modules or, through ``mmfast.patch``, on diffusers'
``AdaLayerNormZero`` / ``AdaLayerNormContinuous`` instances whose norm is a LayerNorm
without affine parameters (see :func:`modulation_fusable`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from mmfast.ops.adaln import adaln_modulate
from mmfast.ops.timestep import timestep_embedding


def modulation_fusable(module) -> bool:
    """Whether a diffusers adaptive norm normalises with a LayerNorm without affine."""
    norm = getattr(module, "norm", None)
    return type(norm) is nn.LayerNorm and not norm.elementwise_affine


def ada_layer_norm_zero_forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    """diffusers AdaLayerNormZero.forward: returns (modulated x, gate_msa, shift_mlp,
    scale_mlp, gate_mlp)."""
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(F.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    return adaln_modulate(x, shift_msa, scale_msa, self.norm.eps), gate_msa, shift_mlp, scale_mlp, gate_mlp


def ada_layer_norm_zero_single_forward(self, x, emb=None):
    """diffusers AdaLayerNormZeroSingle.forward (FLUX.1's single-stream blocks): returns
    (modulated x, gate)."""
    shift, scale, gate = self.linear(F.silu(emb)).chunk(3, dim=1)
    return adaln_modulate(x, shift, scale, self.norm.eps), gate


def sd35_ada_layer_norm_zero_x_forward(self, hidden_states, emb=None):
    """diffusers SD35AdaLayerNormZeroX.forward (SD3.5's dual-attention blocks): nine vectors;
    the same LayerNorm of x modulated twice, for the joint attention and for ``attn2``.
    Returns (x for attn, gate_msa, shift_mlp, scale_mlp, gate_mlp, x for attn2, gate_msa2)."""
    emb = self.linear(F.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = emb.chunk(
        9, dim=1)
    eps = self.norm.eps
    return (adaln_modulate(hidden_states, shift_msa, scale_msa, eps), gate_msa, shift_mlp, scale_mlp, gate_mlp,
            adaln_modulate(hidden_states, shift_msa2, scale_msa2, eps), gate_msa2)


def ada_layer_norm_continuous_forward(self, x, conditioning_embedding):
    """diffusers AdaLayerNormContinuous.forward (layer_norm type): the projection gives
    (scale, shift), in that order."""
    emb = self.linear(F.silu(conditioning_embedding).to(x.dtype))
    scale, shift = emb.chunk(2, dim=1)
    return adaln_modulate(x, shift, scale, self.norm.eps)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class LabelEmbedding(nn.Module):
    """Class-label table with one extra row (the "no label" class of classifier-free
    guidance). Label dropout during training is the caller's job here."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)


class CombinedTimestepLabelEmbeddings(nn.Module):
    """DiT's conditioning: sinusoidal timestep (256 channels) -> MLP, plus a class embedding."""

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim)
        self.class_embedder = LabelEmbedding(num_classes, embedding_dim)

    def forward(self, timestep, class_labels, hidden_dtype=None):
        t = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
        return self.timestep_embedder(t.to(dtype=hidden_dtype)) + self.class_embedder(class_labels)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero: six per-sample vectors from the conditioning, the first two modulating
    x. With ``num_embeddings`` it embeds (timestep, class label) itself, as in DiT."""

    def __init__(self, embedding_dim: int, num_embeddings: int | None = None, bias: bool = True):
        super().__init__()
        self.emb = CombinedTimestepLabelEmbeddings(num_embeddings, embedding_dim) if num_embeddings else None
        self.linear = nn.Linear(embedding_dim, 6 * embedding_dim, bias=bias)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False, eps=1e-6)

    forward = ada_layer_norm_zero_forward


class SD35AdaLayerNormZeroX(nn.Module):
    """adaLN-Zero of SD3.5's dual-attention blocks: nine per-sample vectors, a second
    (shift, scale, gate) for the image stream's extra self-attention."""

    def __init__(self, embedding_dim: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(embedding_dim, 9 * embedding_dim, bias=bias)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False, eps=1e-6)

    forward = sd35_ada_layer_norm_zero_x_forward


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm (no affine) modulated by (scale, shift) projected from a conditioning vector."""

    def __init__(self, embedding_dim: int, conditioning_embedding_dim: int, eps: float = 1e-6, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(conditioning_embedding_dim, 2 * embedding_dim, bias=bias)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False, eps=eps)

    forward = ada_layer_norm_continuous_forward
