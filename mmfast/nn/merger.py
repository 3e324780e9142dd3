"""The patch merger of Qwen2-VL / Qwen2.5-VL vision towers: norm, then each run of
spatial_merge_size^2 consecutive tokens (one 2x2 block: the processor orders them so) is
concatenated into one token, then an MLP with GELU.

    PatchMerger(norm="rms")    Qwen2_5_VLPatchMerger (RMSNorm, eps 1e-6)
    PatchMerger(norm="layer")  Qwen2-VL PatchMerger (LayerNorm, eps 1e-6)

State dict as Hugging Face's: ``ln_q``, ``mlp.0`` (Linear), ``mlp.2`` (Linear). The merge
is a free view; the norm is one fused pass and the GELU one elementwise pass (forward and
backward); the two GEMMs are torch's.
"""

from torch import nn

from mmfast.nn.activation import GELU
from mmfast.nn.norm import LayerNorm, RMSNorm


class PatchMerger(nn.Module):
    """[N, context_dim] tokens -> [N / merge^2, dim]."""

    def __init__(self, dim: int, context_dim: int, spatial_merge_size: int = 2, norm: str = "rms",
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if norm not in ("rms", "layer"):
            raise ValueError(f"norm: expected 'rms' (Qwen2.5-VL) or 'layer' (Qwen2-VL), got {norm!r}")
        self.hidden_size = context_dim * spatial_merge_size ** 2
        self.ln_q = (RMSNorm if norm == "rms" else LayerNorm)(context_dim, eps=1e-6, **factory)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden_size, self.hidden_size, **factory),
            GELU(),
            nn.Linear(self.hidden_size, dim, **factory),
        )

    def forward(self, x):
        if x.shape[-1] * x.shape[:-1].numel() % self.hidden_size:
            raise ValueError(f"x: {x.shape[:-1].numel()} tokens of {x.shape[-1]} do not group into merged "
                             f"tokens of {self.hidden_size} values")
        return self.mlp(self.ln_q(x).reshape(-1, self.hidden_size))
