"""Drop-in nn.Modules built on mmfast.ops."""

from mmfast.nn.norm import LayerNorm, RMSNorm
from mmfast.nn.attention import Attention, VarlenAttention
from mmfast.nn.qwen_vision import Qwen2VisionTransformer, Qwen25VisionTransformer

__all__ = ["LayerNorm", "RMSNorm"]
__all__ += ["Attention", "VarlenAttention", "Qwen2VisionTransformer", "Qwen25VisionTransformer"]
