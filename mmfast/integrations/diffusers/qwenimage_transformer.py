"""diffusers ``QwenImageTransformer2DModel`` (Qwen-Image, Qwen-Image-Edit, Qwen-Image-Layered):
joint text + image attention on mmfast attention with the 3-axis rotary applied inside
the kernel (complex tables turned into (cos, sin) once per call) and the per-head q/k
RMSNorms of both streams on ``rms_norm`` (see mmfast.nn.qwenimage_transformer); each
double-stream block's adaLN modulations and gated residuals fused (``adaln_modulate``,
``gated_residual``); the MLPs' GELU(tanh) in one pass with their input projection's
output; the text input RMSNorm (``txt_norm``) on ``rms_norm``; the final
AdaLayerNormContinuous on ``adaln_modulate``.

Left on diffusers / torch: the input projections (``img_in``, ``txt_in``), the timestep
embedding, ``QwenEmbedRope`` / ``QwenEmbedLayer3DRope`` (they build the rotary tables),
the modulation projections (``img_mod`` / ``txt_mod``: SiLU + Linear), every Linear
(q/k/v and output projections, the MLPs' second Linear, ``proj_out``), the model's forward
loop (ControlNet residuals, gradient checkpointing), the blocks of models with
``zero_cond_t`` (per-token modulation: diffusers' block, mmfast attention), and attention
calls given an ``attention_mask`` (diffusers refuses them), a non-boolean
``encoder_hidden_states_mask`` or no text stream: those run diffusers'
``QwenDoubleStreamAttnProcessor2_0``. A processor set up for diffusers' context
parallelism (``_parallel_config``) is not replaced, and one set after patching is refused.
While patched, the attention backend is mmfast's dispatch (a ``set_attention_backend``
choice applies to the calls left to diffusers only).

``QwenImage21Transformer2DModel`` (transformer_qwenimage21.py) is another architecture
(single-stream blocks, SwiGLU, zero-centred RMSNorms, a KV cache, flex attention) and is
not covered by this family.

``sequence_parallel=group``: text and image tokens split over the ranks, joint attention
on Ulysses (mmfast.integrations.diffusers.qwenimage_sequence_parallel)."""

from __future__ import annotations

import torch

from mmfast.integrations.diffusers.flux_transformer import check_rotary_axes
from mmfast.integrations.diffusers.qwenimage_sequence_parallel import qwenimage_sequence_parallel
from mmfast.integrations.diffusers.replacements import patch_ada_layer_norm_continuous, patch_gelu, patch_rms_norm
from mmfast.integrations.patching import Family, Replacement
from mmfast.nn.flux_attention import check_no_parallel_config
from mmfast.nn.qwenimage_transformer import qwen_attention_forward, qwen_block_forward, qwen_block_fusable


class QwenDoubleStreamAttnProcessor:
    """diffusers ``QwenDoubleStreamAttnProcessor2_0`` semantics on mmfast ops (see the
    module docstring for the calls that run diffusers' processor)."""

    # What diffusers' set_attention_backend / enable_parallelism set on a processor.
    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        check_no_parallel_config(self)
        mask = encoder_hidden_states_mask
        if encoder_hidden_states is None or attention_mask is not None or (
                mask is not None and mask.dtype != torch.bool):
            from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

            processor = QwenDoubleStreamAttnProcessor2_0()
            processor._attention_backend = self._attention_backend
            return processor(attn, hidden_states, encoder_hidden_states, mask, attention_mask, image_rotary_emb)
        batch, text_tokens = encoder_hidden_states.shape[:2]
        if hidden_states.shape[0] != batch:
            raise ValueError(f"encoder_hidden_states: expected the batch of hidden_states ({hidden_states.shape[0]}), "
                             f"got {batch}")
        if mask is not None and tuple(mask.shape) != (batch, text_tokens):
            raise ValueError(f"encoder_hidden_states_mask: expected [B, Tt] = ({batch}, {text_tokens}) (one entry per "
                             f"text token), got {tuple(mask.shape)}")
        return qwen_attention_forward(attn, hidden_states, encoder_hidden_states, image_rotary_emb, keep=mask)


def patch_qwen_attention(module, handle, name: str) -> None:
    """diffusers' own processor only: a custom one set by the user (or one set up for
    diffusers' context parallelism) is left as it is."""
    previous = getattr(module, "processor", None)
    if (type(previous).__name__ == "QwenDoubleStreamAttnProcessor2_0"
            and type(previous).__module__.startswith("diffusers")
            and getattr(previous, "_parallel_config", None) is None):
        replacement = QwenDoubleStreamAttnProcessor()
        replacement._attention_backend = getattr(previous, "_attention_backend", None)
        handle.set_attr(module, "processor", replacement)
        handle.replaced.append((name, "QwenDoubleStreamAttnProcessor2_0 -> mmfast QwenDoubleStreamAttnProcessor"))


def patch_diffusers_rms_norm(module, handle, name: str) -> None:
    """diffusers' RMSNorm (``txt_norm``, the q/k norms); torch's nn.RMSNorm, also named
    RMSNorm, has other attributes and is left."""
    if type(module).__module__.startswith("diffusers"):
        patch_rms_norm(module, handle, name)


def patch_qwen_block(module, handle, name: str) -> None:
    if qwen_block_fusable(module):
        handle.set_forward(module, qwen_block_forward, "double-stream block (fused modulation, gated residuals)",
                           name)


FAMILY = Family(
    "diffusers-qwenimage-transformer",
    model_classes=("QwenImageTransformer2DModel",),
    replacements=(
        Replacement(("Attention",), patch_qwen_attention, "attention processor"),
        Replacement(("QwenImageTransformerBlock",), patch_qwen_block, "double-stream block"),
        Replacement(("AdaLayerNormContinuous",), patch_ada_layer_norm_continuous, "adaLN"),
        Replacement(("RMSNorm",), patch_diffusers_rms_norm, "RMSNorm"),
        Replacement(("GELU",), patch_gelu, "GELU"),
    ),
    prepare=check_rotary_axes,
    sequence_parallel=qwenimage_sequence_parallel,
)
