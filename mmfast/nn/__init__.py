"""Drop-in nn.Modules built on mmfast.ops."""

from mmfast.nn.attention import Attention, VarlenAttention
from mmfast.nn.gated_cross_attention import GatedCrossAttentionBlock
from mmfast.nn.norm import LayerNorm, RMSNorm
from mmfast.nn.perceiver import PerceiverResampler
from mmfast.nn.projector import MLPProjector
from mmfast.nn.qwen_vision import Qwen2VisionTransformer, Qwen25VisionTransformer

__all__ = ["LayerNorm", "RMSNorm"]
__all__ += ["Attention", "VarlenAttention", "Qwen2VisionTransformer", "Qwen25VisionTransformer"]
__all__ += ["GatedCrossAttentionBlock", "MLPProjector", "PerceiverResampler"]
