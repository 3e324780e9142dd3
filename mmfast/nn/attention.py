"""Multi-head attention modules: q/k/v projection, optional rotary, mmfast.ops.attention,
output projection.

``Attention`` takes a padded batch [B, T, dim] (or a packed stream [T, dim] with
``cu_seqlens``); ``VarlenAttention`` is the packed form with the call signature of the
Qwen2-VL / Qwen2.5-VL vision attention: ``forward(x, cu_seqlens, rotary=None,
max_seqlen=None)``.

State dict: with ``fused_qkv=True`` (default) ``qkv`` ([(Hq + 2 Hk) * D, dim], q rows
first, then k, then v) and ``proj``, the names and layout of the Qwen vision attention,
whose weights therefore load as they are; with ``fused_qkv=False``, ``q_proj``,
``k_proj``, ``v_proj`` and ``proj``.

``rotary`` is ``(cos, sin)``, per-token half-width tables as :func:`mmfast.ops.apply_rotary`
takes them ([T, R/2], or [B, T, R/2] for a padded batch); it goes to the attention op,
whose general Triton kernel rotates q and k as it loads them (other backends rotate first).
"""

from __future__ import annotations

from torch import Tensor, nn

from mmfast.ops.attention import attention


class Attention(nn.Module):
    """Self-attention over ``x`` [B, T, dim] (padded) or [T, dim] (packed, with
    ``cu_seqlens``). ``num_kv_heads`` < ``num_heads`` gives GQA; ``causal`` and ``window``
    are passed to :func:`mmfast.ops.attention`. CLIP/SigLIP towers keep their own
    :class:`mmfast.nn.vision.VisionAttention` because Hugging Face names their output
    projection ``out_proj`` where this (Qwen) layout has ``proj``, and a per-instance
    choice of that name would turn this module's plain attributes into name lookups."""

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = True, proj_bias: bool = True,
                 fused_qkv: bool = True, causal: bool = False, window: tuple[int, int] = (-1, -1),
                 scale: float | None = None, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}"
            )
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim: {dim} is not divisible by num_heads={num_heads}; give head_dim")
            head_dim = dim // num_heads
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.causal, self.window, self.scale = causal, tuple(window), scale
        q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
        if fused_qkv:
            self.qkv = nn.Linear(dim, q_out + 2 * kv_out, bias=qkv_bias, **factory)
        else:
            self.q_proj = nn.Linear(dim, q_out, bias=qkv_bias, **factory)
            self.k_proj = nn.Linear(dim, kv_out, bias=qkv_bias, **factory)
            self.v_proj = nn.Linear(dim, kv_out, bias=qkv_bias, **factory)
        self.proj = nn.Linear(q_out, dim, bias=proj_bias, **factory)
        self.fused_qkv = fused_qkv

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[.., dim] -> q [.., Hq, D], k, v [.., Hk, D] (views into one projection when fused)."""
        lead, d = x.shape[:-1], self.head_dim
        if self.fused_qkv:
            qkv = self.qkv(x)
            if self.num_kv_heads == self.num_heads:
                return qkv.view(*lead, 3, self.num_heads, d).unbind(-3)
            q_out, kv_out = self.num_heads * d, self.num_kv_heads * d
            q, k, v = qkv.split([q_out, kv_out, kv_out], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return q.unflatten(-1, (self.num_heads, d)), k.unflatten(-1, (-1, d)), v.unflatten(-1, (-1, d))

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None = None, *,
                cu_seqlens: Tensor | None = None, max_seqlen: int | None = None) -> Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected [B, T, {self.dim}] or [T, {self.dim}] (packed), got {tuple(x.shape)}")
        if (x.dim() == 2) != (cu_seqlens is not None):
            raise ValueError("cu_seqlens: expected for packed [T, dim] input and only for it")
        q, k, v = self.project_qkv(x)
        out = attention(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                        max_seqlen_k=max_seqlen, causal=self.causal, window=self.window, scale=self.scale,
                        rotary=rotary)
        return self.proj(out.flatten(-2))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, window={self.window}")


class VarlenAttention(Attention):
    """Self-attention over a packed stream ``x`` [T, dim] of segments given by
    ``cu_seqlens`` (int32 [B+1]); give ``max_seqlen`` (a Python int) to avoid a device
    sync. Same parameters as :class:`Attention`."""

    def forward(self, x: Tensor, cu_seqlens: Tensor, rotary: tuple[Tensor, Tensor] | None = None,
                max_seqlen: int | None = None) -> Tensor:
        if cu_seqlens is None:
            raise ValueError("cu_seqlens: required by VarlenAttention (use Attention for a padded batch)")
        return super().forward(x, rotary, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

