"""Ops: one file per op family, each a PyTorch reference, torch.library custom ops,
an autograd.Function and a public function that validates its arguments and dispatches
to a backend (see mmfast.dispatch)."""

from mmfast.ops.activation import geglu, gelu, quick_gelu, swiglu
from mmfast.ops.attention import attention
from mmfast.ops.norm import layer_norm, rms_norm
from mmfast.ops.patch_embed import patch_embed, patch_embed_patchified

__all__ = ["attention", "layer_norm", "rms_norm"]
__all__ += ["geglu", "gelu", "quick_gelu", "swiglu"]
__all__ += ["patch_embed", "patch_embed_patchified"]
