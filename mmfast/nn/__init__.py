"""Drop-in nn.Modules built on mmfast.ops."""

from mmfast.nn.blip_vision import BlipVisionTransformer
from mmfast.nn.attention import Attention, VarlenAttention
from mmfast.nn.contrastive import ClipLoss, SigLipLoss
from mmfast.nn.dit import DiTBlock, MMDiTBlock
from mmfast.nn.gated_cross_attention import GatedCrossAttentionBlock
from mmfast.nn.norm import LayerNorm, RMSNorm
from mmfast.nn.perceiver import PerceiverResampler
from mmfast.nn.projector import MLPProjector
from mmfast.nn.qformer import QFormer
from mmfast.nn.qwen_vl_resampler import QwenVLResampler
from mmfast.nn.qwen_vision import Qwen2VisionTransformer, Qwen25VisionTransformer
from mmfast.nn.activation import GELU, QuickGELU
from mmfast.nn.mlp import MLP, SwiGLUMLP
from mmfast.nn.patch_embed import PatchEmbed, PatchEmbed3d
from mmfast.nn.merger import PatchMerger
from mmfast.nn.vision import VisionAttention, VisionBlock, VisionTransformer
from mmfast.nn.resnet import ResnetBlock2D
from mmfast.nn.transformer_2d import Transformer2DBlock
from mmfast.nn.unet import unet2d_condition_model

__all__ = ["LayerNorm", "RMSNorm"]
__all__ += ["Attention", "VarlenAttention", "Qwen2VisionTransformer", "Qwen25VisionTransformer"]
__all__ += ["ClipLoss", "SigLipLoss"]
__all__ += ["GatedCrossAttentionBlock", "MLPProjector", "PerceiverResampler"]
__all__ += ["GELU", "QuickGELU", "MLP", "SwiGLUMLP", "PatchEmbed", "PatchEmbed3d", "PatchMerger"]
__all__ += ["VisionAttention", "VisionBlock", "VisionTransformer"]
__all__ += ["QFormer", "QwenVLResampler"]
__all__ += ["DiTBlock", "MMDiTBlock", "ResnetBlock2D", "Transformer2DBlock", "unet2d_condition_model"]
__all__ += ["BlipVisionTransformer"]
from mmfast.nn.sd3_transformer import sd3_transformer_model
__all__ += ["sd3_transformer_model"]
from mmfast.nn.text import TextTransformer, TextTransformerWithProjection
__all__ += ["TextTransformer", "TextTransformerWithProjection"]
from mmfast.nn.autoencoder_kl import autoencoder_kl, use_mmfast_vae_blocks
__all__ += ["autoencoder_kl", "use_mmfast_vae_blocks"]
from mmfast.nn.qwen3_vision import Qwen3VisionTransformer
from mmfast.nn.mlp import LinearFcMLP
from mmfast.nn.merger import Qwen3PatchMerger
__all__ += ["Qwen3VisionTransformer", "LinearFcMLP", "Qwen3PatchMerger"]
