"""Drop-in nn.Modules built on mmfast.ops."""

from mmfast.nn.dit import DiTBlock, MMDiTBlock
from mmfast.nn.norm import LayerNorm, RMSNorm
from mmfast.nn.resnet import ResnetBlock2D
from mmfast.nn.transformer_2d import Transformer2DBlock
from mmfast.nn.unet import unet2d_condition_model

__all__ = ["LayerNorm", "RMSNorm"]
__all__ += ["DiTBlock", "MMDiTBlock", "ResnetBlock2D", "Transformer2DBlock", "unet2d_condition_model"]
