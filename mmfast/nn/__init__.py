"""Drop-in nn.Modules built on mmfast.ops."""

from mmfast.nn.norm import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
