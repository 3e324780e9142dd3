"""Ops: one file per op family, each a PyTorch reference, torch.library custom ops,
an autograd.Function and a public function that validates its arguments and dispatches
to a backend (see mmfast.dispatch)."""

from mmfast.ops.attention import attention
from mmfast.ops.cross_attention import cross_attention
from mmfast.ops.norm import layer_norm, rms_norm

__all__ = ["attention", "cross_attention", "layer_norm", "rms_norm"]
