"""Ops: one file per op family, each a PyTorch reference, torch.library custom ops,
an autograd.Function and a public function that validates its arguments and dispatches
to a backend (see mmfast.dispatch)."""

from mmfast.ops.attention import attention
from mmfast.ops.contrastive import clip_loss, nt_xent_loss, siglip_loss
from mmfast.ops.norm import layer_norm, rms_norm
from mmfast.ops.retrieval import retrieval_metrics, zero_shot_topk

__all__ = ["attention", "layer_norm", "rms_norm"]
__all__ += ["clip_loss", "nt_xent_loss", "siglip_loss", "retrieval_metrics", "zero_shot_topk"]
