"""Ops: one file per op family, each a PyTorch reference, torch.library custom ops,
an autograd.Function and a public function that validates its arguments and dispatches
to a backend (see mmfast.dispatch)."""

from mmfast.ops.adaln import adaln_modulate, gated_residual
from mmfast.ops.attention import attention
from mmfast.ops.group_norm import group_norm
from mmfast.ops.norm import layer_norm, rms_norm
from mmfast.ops.timestep import timestep_embedding

__all__ = ["attention", "layer_norm", "rms_norm"]
__all__ += ["adaln_modulate", "gated_residual", "group_norm", "timestep_embedding"]
