"""CLIP / SigLIP-style vision transformers on mmfast ops, with the module names of Hugging
Face's CLIPVisionModel and SiglipVisionModel, so that ``tower.load_state_dict(hf.state_dict())``
loads their weights as they are (``hf.vision_model`` of a CLIPModel / SiglipModel).

    embeddings      PatchEmbed: patch GEMM + bias + position embedding (+ class token), fused
    pre_layrnorm    LayerNorm (CLIP only; the spelling is Hugging Face's)
    encoder.layers  VisionBlock x depth: pre-LN attention and MLP blocks
    post_layernorm  CLIP: on the class token -> pooler_output; SigLIP: on every token
    head            SigLIP's attention-pooling head (``vision_use_head``) -> pooler_output

Attention runs mmfast.ops.attention on the padded layout [B, T, H, D] (no mask: every
image has the same token count); LayerNorms are mmfast's, each fused with the residual
add before it; the MLP activation is one fused pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.nn.mlp import MLP
from mmfast.nn.norm import LayerNorm
from mmfast.nn.patch_embed import PatchEmbed
from mmfast.ops.attention import attention


class VisionOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None


class PackedVisionOutput(NamedTuple):
    """Images of different sizes as one stream: image i owns tokens
    ``cu_seqlens[i] .. cu_seqlens[i + 1]`` of ``last_hidden_state`` [T, E]."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None  # [images, E]
    cu_seqlens: torch.Tensor


class Packing(NamedTuple):
    """Segment boundaries of a packed stream: int32 ``cu_seqlens`` on the device and the
    longest segment as a Python int (known from the image shapes: no sync).
    ``cu_seqlens_k``: the keys' boundaries where they differ from the queries' (a padded
    text batch, :func:`mmfast.nn.text.pack_padding`); None: the same."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    cu_seqlens_k: torch.Tensor | None = None


class VisionAttention(nn.Module):
    """Multi-head self-attention over [B, T, E] with Hugging Face's
    ``q_proj``/``k_proj``/``v_proj``/``out_proj``: bidirectional, or ``causal`` (CLIP's
    text tower). It is not :class:`mmfast.nn.attention.Attention` because that one names
    its output projection ``proj`` (Qwen's layout) and has no ``out_proj`` spelling for
    CLIP/SigLIP weights. ``dropout``: attention-probability dropout in training mode
    (Hugging Face's ``attention_dropout``), inside the attention kernels."""

    def __init__(self, embed_dim: int, num_heads: int, device=None, dtype=None, causal: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide embed_dim {embed_dim}")
        factory = {"device": device, "dtype": dtype}
        self.causal, self.dropout = causal, float(dropout)
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(embed_dim, embed_dim, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **factory)

    def forward(self, x, packed: Packing | None = None):
        """``x`` [B, T, E]; or, with ``packed``, one stream [T, E] of several images."""
        heads = (*x.shape[:-1], self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        common = dict(causal=self.causal, scale=self.scale, dropout_p=self.dropout if self.training else 0.0)
        if packed is None:
            out = attention(q, k, v, **common)
        else:
            keys = packed.cu_seqlens if packed.cu_seqlens_k is None else packed.cu_seqlens_k
            out = attention(q, k, v, cu_seqlens_q=packed.cu_seqlens, cu_seqlens_k=keys, max_seqlen_q=packed.max_seqlen,
                            max_seqlen_k=packed.max_seqlen, **common)
        return self.out_proj(out.reshape(x.shape[:-1] + (-1,)))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}" + (", causal" if self.causal else "")
                + (f", dropout={self.dropout}" if self.dropout else ""))


def set_attention_dropout(model: nn.Module, p: float) -> None:
    """Give every :class:`VisionAttention` of ``model`` the attention dropout ``p``."""
    for module in model.modules():
        if isinstance(module, VisionAttention):
            module.dropout = float(p)


class VisionBlock(nn.Module):
    """Pre-LN transformer block: ``h += attn(ln1(h)); h += mlp(ln2(h))``. Hugging Face
    CLIPEncoderLayer names. Residual adds are fused into the norms: the first into
    ``layer_norm2``; the second, through :meth:`forward_residual`, into the next block's
    ``layer_norm1``. ``attention``: the self-attention class (BLIP's fused ``qkv`` layout
    takes the place of CLIP's separate projections; same ``(embed_dim, num_heads)`` call)."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, hidden_act: str = "gelu",
                 eps: float = 1e-5, device=None, dtype=None, attention=VisionAttention):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.self_attn = attention(hidden_size, num_heads, **factory)
        self.layer_norm1 = LayerNorm(hidden_size, eps=eps, **factory)
        self.mlp = MLP(hidden_size, intermediate_size, hidden_act, **factory)
        self.layer_norm2 = LayerNorm(hidden_size, eps=eps, **factory)

    def forward(self, hidden_states, packed: Packing | None = None):
        residual, delta = self.forward_residual(hidden_states, None, packed)
        return residual + delta

    def forward_residual(self, residual, delta, packed: Packing | None = None):
        """The block on ``residual + delta`` (``delta`` None: on ``residual``), returned
        unsummed as ``(residual, delta)`` so the next block adds them in its first norm."""
        if delta is None:
            normed = self.layer_norm1(residual)
        else:
            normed, residual = self.layer_norm1(delta, residual=residual)
        normed, residual = self.layer_norm2(self.self_attn(normed, packed), residual=residual)
        return residual, self.mlp(normed)


class Encoder(nn.Module):
    def __init__(self, layers: list[VisionBlock]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden_states, packed: Packing | None = None):
        delta = None
        for layer in self.layers:
            hidden_states, delta = layer.forward_residual(hidden_states, delta, packed)
        return hidden_states if delta is None else hidden_states + delta


class AttentionPoolingHead(nn.Module):
    """SigLIP's multi-head attention pooling: a learned probe attends over the tokens,
    then ``x + mlp(layernorm(x))``. Hugging Face's names (``probe``, ``attention`` a
    torch MultiheadAttention, ``layernorm``, ``mlp``)."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, hidden_act: str,
                 eps: float, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.probe = nn.Parameter(torch.randn(1, 1, hidden_size, **factory))
        # One query per image: torch's own MultiheadAttention keeps the parameter layout.
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True, **factory)
        self.layernorm = LayerNorm(hidden_size, eps=eps, **factory)
        self.mlp = MLP(hidden_size, intermediate_size, hidden_act, **factory)

    def forward(self, hidden_states, packed: Packing | None = None):
        if packed is None:
            probe = self.probe.expand(hidden_states.shape[0], -1, -1)
            pooled = self.attention(probe, hidden_states, hidden_states, need_weights=False)[0][:, 0]
        else:
            pooled = self._pool_packed(hidden_states, packed)
        return pooled + self.mlp(self.layernorm(pooled))

    def _pool_packed(self, tokens, packed: Packing):
        # The same MultiheadAttention weights, one probe query per image over its tokens.
        mha = self.attention
        E, H = tokens.shape[-1], mha.num_heads
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        images = packed.cu_seqlens.shape[0] - 1
        q = F.linear(self.probe.reshape(1, E), w_q, b_q).expand(images, E).reshape(images, H, E // H)
        k = F.linear(tokens, w_k, b_k).view(-1, H, E // H)
        v = F.linear(tokens, w_v, b_v).view(-1, H, E // H)
        one = torch.arange(images + 1, dtype=torch.int32, device=tokens.device)
        out = attention(q, k, v, cu_seqlens_q=one, cu_seqlens_k=packed.cu_seqlens,
                        max_seqlen_q=1, max_seqlen_k=packed.max_seqlen)
        return mha.out_proj(out.reshape(images, E))


class VisionTransformer(nn.Module):
    """A CLIP (``style="clip"``: class token, no patch bias, ``pre_layrnorm``, pooled class
    token) or SigLIP (``style="siglip"``: no class token, patch bias, ``post_layernorm`` on
    all tokens, optional attention-pooling head) vision tower.

    ``forward(pixel_values, interpolate_pos_encoding=False)`` returns
    ``VisionOutput(last_hidden_state, pooler_output)`` as the Hugging Face model does;
    :meth:`forward_packed` takes images of different sizes as one packed stream.
    :meth:`from_config` builds one from a CLIPVisionConfig / SiglipVisionConfig.
    """

    def __init__(self, *, style: str, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                 image_size: int, patch_size: int, num_channels: int = 3, hidden_act: str = "gelu",
                 layer_norm_eps: float = 1e-5, use_head: bool = True, device=None, dtype=None):
        super().__init__()
        if style not in ("clip", "siglip"):
            raise ValueError(f"style: expected 'clip' or 'siglip', got {style!r}")
        factory = {"device": device, "dtype": dtype}
        self.style = style
        clip = style == "clip"
        self.embeddings = PatchEmbed(hidden_size, image_size, patch_size, num_channels,
                                     class_token=clip, bias=not clip, **factory)
        if clip:
            self.pre_layrnorm = LayerNorm(hidden_size, eps=layer_norm_eps, **factory)
        self.encoder = Encoder([
            VisionBlock(hidden_size, num_heads, intermediate_size, hidden_act, layer_norm_eps, **factory)
            for _ in range(num_layers)
        ])
        self.post_layernorm = LayerNorm(hidden_size, eps=layer_norm_eps, **factory)
        self.use_head = not clip and use_head
        if self.use_head:
            self.head = AttentionPoolingHead(hidden_size, num_heads, intermediate_size, hidden_act,
                                             layer_norm_eps, **factory)

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> "VisionTransformer":
        """From a Hugging Face CLIPVisionConfig or SiglipVisionConfig."""
        styles = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
        model_type = getattr(config, "model_type", None)
        if model_type not in styles:
            raise ValueError(f"config: expected a CLIP or SigLIP vision config "
                             f"(model_type {', '.join(styles)}), got {model_type!r}")
        tower = cls(style=styles[model_type], hidden_size=config.hidden_size,
                    num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                    intermediate_size=config.intermediate_size, image_size=config.image_size,
                    patch_size=config.patch_size, num_channels=config.num_channels, hidden_act=config.hidden_act,
                    layer_norm_eps=config.layer_norm_eps, use_head=getattr(config, "vision_use_head", True),
                    device=device, dtype=dtype)
        set_attention_dropout(tower, getattr(config, "attention_dropout", 0.0))
        return tower

    def forward_packed(self, images) -> PackedVisionOutput:
        """Images [C, H_i, W_i] of different sizes (multiples of the patch size) as one
        packed token stream, each attending only to itself (varlen attention), with the
        position table interpolated per grid: the result equals running each image alone
        with ``interpolate_pos_encoding=True``, without padding any of them."""
        tokens, cu_seqlens = self.embeddings.forward_packed(images)
        P, cls = self.embeddings.patch_size, int(self.style == "clip")
        longest = max((im.shape[-2] // P) * (im.shape[-1] // P) + cls for im in images)
        packed = Packing(cu_seqlens, longest)
        if self.style == "clip":
            hidden = self.encoder(self.pre_layrnorm(tokens), packed)
            return PackedVisionOutput(hidden, self.post_layernorm(hidden[cu_seqlens[:-1].long()]), cu_seqlens)
        hidden = self.post_layernorm(self.encoder(tokens, packed))
        pooled = self.head(hidden, packed) if self.use_head else None
        return PackedVisionOutput(hidden, pooled, cu_seqlens)

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False) -> VisionOutput:
        hidden = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        if self.style == "clip":
            hidden = self.encoder(self.pre_layrnorm(hidden))
            return VisionOutput(hidden, self.post_layernorm(hidden[:, 0]))
        hidden = self.post_layernorm(self.encoder(hidden))
        return VisionOutput(hidden, self.head(hidden) if self.use_head else None)
