"""CLIP (transformers CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel): the vision
tower's embeddings, attention, encoder layers, MLPs and LayerNorms. The text tower of a
CLIPModel (causal, padded) is left as it is."""

from mmfast.integrations.patching import Family, Replacement
from mmfast.integrations.transformers import _vit

FAMILY = Family(
    "clip",
    model_classes=("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel"),
    replacements=(
        Replacement(("CLIPVisionEmbeddings",), _vit.patch_embeddings, "fused patch+position embedding"),
        Replacement(("CLIPAttention",), _vit.patch_attention, "mmfast attention"),
        Replacement(("CLIPEncoderLayer",), _vit.patch_encoder_layer, "norm fused with residual add"),
        Replacement(("CLIPMLP",), _vit.patch_mlp, "fused activation"),
        Replacement(("LayerNorm",), _vit.patch_layer_norm, "mmfast layer_norm"),
    ),
    prepare=lambda target, handle: _vit.vision_root(target),
    notes="vision tower only",
)
