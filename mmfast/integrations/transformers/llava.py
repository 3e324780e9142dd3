"""LLaVA (LlavaForConditionalGeneration, LlavaModel): the CLIP or SigLIP vision tower gets
the same replacements as in the clip and siglip families, and the multimodal projector's
activation runs mmfast's one-pass GELU kernels (forward and backward) between its two
GEMMs. A projector whose activation mmfast does not have is left as it is. The language
model's decoder self-attention (Llama, Mistral, Qwen2, ...) runs the "mmfast" attention
implementation; its other layers are left as they are."""

from __future__ import annotations

from mmfast.integrations.patching import Family, Replacement, module_name
from mmfast.integrations.transformers.clip import FAMILY as CLIP
from mmfast.integrations.transformers.lm_attention import patch_decoder_attention
from mmfast.integrations.transformers.siglip import FAMILY as SIGLIP
from mmfast.nn.projector import ACTIVATIONS


def _patch_projector(module, handle, name):
    act = _activation_name(module)
    if act is None:
        return
    fn = ACTIVATIONS[act]

    def forward(self, image_features):
        return self.linear_2(fn(self.linear_1(image_features)))

    handle.set_forward(module, forward, f"projector {act}", name)


def _activation_name(module) -> str | None:
    """The Hugging Face activation name of ``module.act`` (an ACT2FN instance)."""
    from transformers.activations import ACT2CLS

    for name, entry in ACT2CLS.items():
        cls = entry[0] if isinstance(entry, tuple) else entry
        if type(module.act) is cls and name in ACTIVATIONS:
            return name
    return None


def _prepare(target, handle):
    model = getattr(target, "model", target)
    patch_decoder_attention(model.language_model, handle, module_name(target, model.language_model), outer=target)
    return [model]


FAMILY = Family(
    "llava",
    model_classes=("LlavaForConditionalGeneration", "LlavaModel"),
    replacements=(
        Replacement(("LlavaMultiModalProjector",), _patch_projector, "projector activation"),
        # The towers' rows; their LayerNorm row also matches nothing in the language model,
        # whose norms are RMSNorms of other class names.
        *CLIP.replacements,
        *(row for row in SIGLIP.replacements if row.module_classes != ("LayerNorm",)),
    ),
    prepare=_prepare,
)
