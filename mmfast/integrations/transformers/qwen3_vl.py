"""Qwen3-VL (Hugging Face transformers): the vision tower's per-frame full attention
becomes packed varlen attention with the 2D rotary fused, fed by cached index plumbing
(cu_seqlens, rotary positions and the learned position grid's bilinear taps, computed
once per distinct ``grid_thw``); its LayerNorms, GELU-tanh MLPs and the GELU of every
patch merger (the final one and the DeepStack ones) become mmfast's fused ones. In the
language model (Qwen3), every RMSNorm, the per-head q/k norms included, runs mmfast's
rms_norm, the SiLU-gated MLPs its swiglu, the self-attention the "mmfast" attention
implementation, and the DeepStack add into the first layers' hidden states a
scatter-add with no host sync.

Not replaced: the patch embedding (a Conv3d whose stride equals its kernel: one GEMM in
cuDNN already), the position-grid resampling itself (Hugging Face's weighted sum over the
cached taps: a gather of 4 rows per patch, nothing a kernel would save a pass on outside
a fused patch-embedding epilogue), and the language model's multimodal rotary (torch's,
between the q/k norms and the attention call: mmfast has no op fusing a norm with
rotary)."""

from mmfast.integrations.patching import Family, PatchHandle, Replacement
from mmfast.integrations.transformers._fused_layers import patch_layer_norm, patch_rms_norm
from mmfast.integrations.transformers._qwen_vision import (
    patch_linear_fc_merger,
    patch_linear_fc_mlp,
    patch_swiglu_mlp,
    patch_vision_attention,
    patch_vision_tower,
)
from mmfast.integrations.transformers.lm_attention import patch_decoder_attention

DEEPSTACK = "deepstack scatter-add (no host sync)"


def _deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
    """``hidden_states`` with ``visual_embeds`` added at the positions ``visual_pos_masks``
    marks (in order), as Hugging Face's, whose boolean indexing reads the count back to
    the host twice per layer. x + 0 == x, so the tokens that are not visual keep their
    values bit for bit."""
    mask = visual_pos_masks.to(hidden_states.device).unsqueeze(-1)
    visual_embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype)
    return hidden_states + hidden_states.new_zeros(hidden_states.shape).masked_scatter(mask, visual_embeds)


def patch_deepstack(module, handle: PatchHandle, name: str) -> None:
    handle.set_attr(module, "_deepstack_process", _deepstack_process.__get__(module))
    handle.replaced.append((name, DEEPSTACK))


def _prepare(target, handle):
    patch_decoder_attention(target, handle)  # the language model's (the vision tower's attention is not causal)
    return target


FAMILY = Family(
    "qwen3_vl",
    model_classes=("Qwen3VLForConditionalGeneration", "Qwen3VLModel", "Qwen3VLVisionModel"),
    replacements=(
        Replacement(("Qwen3VLVisionModel",), patch_vision_tower, "cached vision indices"),
        Replacement(("Qwen3VLVisionAttention",), patch_vision_attention, "varlen attention + fused rotary"),
        Replacement(("LayerNorm",), patch_layer_norm, "layer_norm"),
        Replacement(("Qwen3VLVisionMLP",), patch_linear_fc_mlp, "gelu_tanh"),
        Replacement(("Qwen3VLVisionPatchMerger",), patch_linear_fc_merger, "merger gelu"),
        Replacement(("Qwen3VLTextRMSNorm",), patch_rms_norm, "rms_norm"),
        Replacement(("Qwen3VLTextMLP",), patch_swiglu_mlp, "swiglu"),
        Replacement(("Qwen3VLTextModel",), patch_deepstack, DEEPSTACK),
    ),
    prepare=_prepare,
    notes="the patch embedding and the language model's rotary are not replaced",
)
