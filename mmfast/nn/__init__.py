"""Drop-in nn.Modules built on mmfast.ops."""

from mmfast.nn.contrastive import ClipLoss, SigLipLoss
from mmfast.nn.norm import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
__all__ += ["ClipLoss", "SigLipLoss"]
