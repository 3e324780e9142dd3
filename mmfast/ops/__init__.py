"""Ops: one file per op family, each a PyTorch reference, torch.library custom ops,
an autograd.Function and a public function that validates its arguments and dispatches
to a backend (see mmfast.dispatch)."""

from mmfast.ops.attention import attention
from mmfast.ops.norm import layer_norm, rms_norm
from mmfast.ops.scheduler_step import StepCoefficients, StepTable, guided_step

__all__ = ["attention", "layer_norm", "rms_norm"]
__all__ += ["StepCoefficients", "StepTable", "guided_step"]
