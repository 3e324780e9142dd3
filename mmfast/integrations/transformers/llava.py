"""LLaVA (LlavaForConditionalGeneration, LlavaModel): the multimodal projector's activation
runs mmfast's one-pass GELU kernels (forward and backward) between its two GEMMs. A
projector whose activation mmfast does not have is left as it is."""

from __future__ import annotations

from mmfast.integrations.patching import Family, Replacement
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


FAMILY = Family(
    "llava",
    model_classes=("LlavaForConditionalGeneration", "LlavaModel"),
    replacements=(Replacement(("LlavaMultiModalProjector",), _patch_projector, "projector activation"),),
)
