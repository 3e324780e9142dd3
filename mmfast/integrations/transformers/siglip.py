"""SigLIP (transformers SiglipVisionModel, SiglipModel, SiglipTextModel): the vision tower's
embeddings, attention, encoder layers, MLPs and LayerNorms (the pooling head's LayerNorm
and MLP too; its one-query torch MultiheadAttention stays), and the text tower as a whole
(:mod:`._text`: mmfast's text tower on the model's own parameters)."""

from mmfast.integrations.patching import Family, Replacement
from mmfast.integrations.transformers import _text, _vit
from mmfast.integrations.transformers._fused_layers import patch_layer_norm


def _prepare(target, handle):
    _text.patch_text(target, handle)
    return _vit.vision_root(target)


FAMILY = Family(
    "siglip",
    model_classes=("SiglipVisionModel", "SiglipModel", "SiglipTextModel"),
    replacements=(
        Replacement(("SiglipVisionEmbeddings",), _vit.patch_embeddings, "fused patch+position embedding"),
        Replacement(("SiglipAttention",), _vit.patch_attention, "mmfast attention"),
        Replacement(("SiglipEncoderLayer",), _vit.patch_encoder_layer, "norm fused with residual add"),
        Replacement(("SiglipMLP",), _vit.patch_mlp, "fused activation"),
        Replacement(("LayerNorm",), patch_layer_norm, "mmfast layer_norm"),
    ),
    prepare=_prepare,
    notes="vision tower by module, text tower whole",
)
