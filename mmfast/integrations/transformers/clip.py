"""CLIP (transformers CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel,
CLIPTextModel, CLIPTextModelWithProjection): the vision tower's embeddings, attention,
encoder layers, MLPs and LayerNorms, and the causal text tower as a whole (:mod:`._text`:
mmfast's text tower on the model's own parameters)."""

from mmfast.integrations.patching import Family, Replacement
from mmfast.integrations.transformers import _text, _vit
from mmfast.integrations.transformers._fused_layers import patch_layer_norm


def _prepare(target, handle):
    _text.patch_text(target, handle)
    return _vit.vision_root(target)


FAMILY = Family(
    "clip",
    model_classes=("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "CLIPTextModel",
                   "CLIPTextModelWithProjection"),
    replacements=(
        Replacement(("CLIPVisionEmbeddings",), _vit.patch_embeddings, "fused patch+position embedding"),
        Replacement(("CLIPAttention",), _vit.patch_attention, "mmfast attention"),
        Replacement(("CLIPEncoderLayer",), _vit.patch_encoder_layer, "norm fused with residual add"),
        Replacement(("CLIPMLP",), _vit.patch_mlp, "fused activation"),
        Replacement(("LayerNorm",), patch_layer_norm, "mmfast layer_norm"),
    ),
    prepare=_prepare,
    notes="vision tower by module, text tower whole",
)
