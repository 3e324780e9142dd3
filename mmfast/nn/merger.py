"""The patch mergers of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers: norm, then
each run of spatial_merge_size^2 consecutive tokens (one 2x2 block: the processor orders
them so) is concatenated into one token, then an MLP with GELU.

    PatchMerger(norm="rms")    Qwen2_5_VLPatchMerger (RMSNorm, eps 1e-6)
    PatchMerger(norm="layer")  Qwen2-VL PatchMerger (LayerNorm, eps 1e-6)
    Qwen3PatchMerger           Qwen3VLVisionPatchMerger (LayerNorm before the shuffle, or
                               after it in the DeepStack mergers)

State dict as Hugging Face's: ``ln_q``, ``mlp.0`` (Linear), ``mlp.2`` (Linear) for
PatchMerger; ``norm``, ``linear_fc1``, ``linear_fc2`` for Qwen3PatchMerger. The merge
is a free view; the norm is one fused pass (taking in the tower's last residual add when
given ``residual``) and the GELU one elementwise pass (forward and backward); the two GEMMs
are torch's.
"""

from __future__ import annotations

from torch import Tensor, nn

from mmfast.nn.activation import GELU
from mmfast.nn.norm import LayerNorm, RMSNorm

# ``norm`` names -> mmfast's fused norms (the Qwen towers' blocks use the same names).
NORMS = {"rms": RMSNorm, "layer": LayerNorm}


class PatchMerger(nn.Module):
    """[N, context_dim] tokens -> [N / merge^2, dim]."""

    def __init__(self, dim: int, context_dim: int, spatial_merge_size: int = 2, norm: str = "rms",
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if norm not in NORMS:
            raise ValueError(f"norm: expected 'rms' (Qwen2.5-VL) or 'layer' (Qwen2-VL), got {norm!r}")
        self.hidden_size = context_dim * spatial_merge_size ** 2
        self.ln_q = NORMS[norm](context_dim, eps=1e-6, **factory)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden_size, self.hidden_size, **factory),
            GELU(),
            nn.Linear(self.hidden_size, dim, **factory),
        )

    def forward(self, x: Tensor, residual: Tensor | None = None):
        """Merged tokens; with ``residual``, the norm reads ``x + residual`` in its fused
        pass and ``(merged, x + residual)`` is returned."""
        if x.shape[-1] * x.shape[:-1].numel() % self.hidden_size:
            raise ValueError(f"x: {x.shape[:-1].numel()} tokens of {x.shape[-1]} do not group into merged "
                             f"tokens of {self.hidden_size} values")
        if residual is None:
            return self.mlp(self.ln_q(x).reshape(-1, self.hidden_size))
        normed, stream = self.ln_q(x, residual=residual)
        return self.mlp(normed.reshape(-1, self.hidden_size)), stream


class Qwen3PatchMerger(nn.Module):
    """Qwen3-VL's patch merger, [N, context_dim] tokens -> [N / merge^2, dim]: a LayerNorm
    (eps 1e-6) on each token before the 2x2 shuffle (``postshuffle_norm`` False: the
    final merger) or on each shuffled group after it (True: the DeepStack mergers), then
    linear_fc2(GELU(linear_fc1)). State dict as Hugging Face's ``Qwen3VLVisionPatchMerger``:
    ``norm``, ``linear_fc1``, ``linear_fc2``."""

    def __init__(self, dim: int, context_dim: int, spatial_merge_size: int = 2, postshuffle_norm: bool = False,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = context_dim * spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(self.hidden_size if postshuffle_norm else context_dim, eps=1e-6, **factory)
        self.linear_fc1 = nn.Linear(self.hidden_size, self.hidden_size, **factory)
        self.act_fn = GELU()
        self.linear_fc2 = nn.Linear(self.hidden_size, dim, **factory)

    def forward(self, x: Tensor, residual: Tensor | None = None):
        """Merged tokens; with ``residual`` (pre-shuffle norm only), the norm reads
        ``x + residual`` in its fused pass and ``(merged, x + residual)`` is returned."""
        if x.shape[-1] * x.shape[:-1].numel() % self.hidden_size:
            raise ValueError(f"x: {x.shape[:-1].numel()} tokens of {x.shape[-1]} do not group into merged "
                             f"tokens of {self.hidden_size} values")
        if residual is not None and self.postshuffle_norm:
            raise ValueError("residual: only a merger that norms before the shuffle takes the residual add")
        stream = None
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.hidden_size))
        elif residual is None:
            x = self.norm(x).reshape(-1, self.hidden_size)
        else:
            x, stream = self.norm(x, residual=residual)
            x = x.reshape(-1, self.hidden_size)
        merged = self.linear_fc2(self.act_fn(self.linear_fc1(x)))
        return merged if residual is None else (merged, stream)
