"""SigLIP (transformers SiglipVisionModel, SiglipModel): the vision tower's embeddings,
attention, encoder layers, MLPs and LayerNorms (the pooling head's LayerNorm and MLP too;
its one-query torch MultiheadAttention stays). The text tower is left as it is."""

from mmfast.integrations.patching import Family, Replacement
from mmfast.integrations.transformers import _vit

FAMILY = Family(
    "siglip",
    model_classes=("SiglipVisionModel", "SiglipModel"),
    replacements=(
        Replacement(("SiglipVisionEmbeddings",), _vit.patch_embeddings, "fused patch+position embedding"),
        Replacement(("SiglipAttention",), _vit.patch_attention, "mmfast attention"),
        Replacement(("SiglipEncoderLayer",), _vit.patch_encoder_layer, "norm fused with residual add"),
        Replacement(("SiglipMLP",), _vit.patch_mlp, "fused activation"),
        Replacement(("LayerNorm",), _vit.patch_layer_norm, "mmfast layer_norm"),
    ),
    prepare=lambda target, handle: _vit.vision_root(target),
    notes="vision tower only",
)
