"""Ops: one file per op family, each a PyTorch reference, torch.library custom ops,
an autograd.Function and a public function that validates its arguments and dispatches
to a backend (see mmfast.dispatch)."""

from mmfast.ops.activation import geglu, gelu, quick_gelu, swiglu
from mmfast.ops.adaln import adaln_modulate, gated_residual
from mmfast.ops.attention import attention
from mmfast.ops.attention_rel_pos import attention_rel_pos, decomposed_rel_pos
from mmfast.ops.channel_rms_norm import channel_rms_norm
from mmfast.ops.contrastive import clip_loss, nt_xent_loss, siglip_loss
from mmfast.ops.cross_attention import cross_attention
from mmfast.ops.group_norm import group_norm
from mmfast.ops.linear_cross_entropy import linear_cross_entropy
from mmfast.ops.norm import layer_norm, rms_norm
from mmfast.ops.retrieval import retrieval_metrics, zero_shot_topk
from mmfast.ops.patch_embed import patch_embed, patch_embed_packed, patch_embed_patchified
from mmfast.ops.rotary import apply_rotary
from mmfast.ops.scheduler_step import CorrectorCoefficients, StepCoefficients, StepTable, guided_step
from mmfast.ops.timestep import timestep_embedding
from mmfast.ops.vision_windows import qwen_vision_indices, vision_rotary_cos_sin

__all__ = ["attention", "layer_norm", "rms_norm"]
__all__ += ["geglu", "gelu", "quick_gelu", "swiglu"]
__all__ += ["apply_rotary", "qwen_vision_indices", "vision_rotary_cos_sin"]
__all__ += ["cross_attention"]
__all__ += ["adaln_modulate", "gated_residual", "group_norm", "timestep_embedding"]
__all__ += ["CorrectorCoefficients", "StepCoefficients", "StepTable", "guided_step"]
__all__ += ["clip_loss", "nt_xent_loss", "siglip_loss", "retrieval_metrics", "zero_shot_topk"]
__all__ += ["patch_embed", "patch_embed_packed", "patch_embed_patchified"]
__all__ += ["linear_cross_entropy"]
__all__ += ["attention_rel_pos", "decomposed_rel_pos"]
__all__ += ["channel_rms_norm"]
