"""Text-only decoder LMs (Llama, Qwen2, Mistral): every decoder self-attention runs the
"mmfast" attention implementation. Other transformers decoders written against the
AttentionInterface take the same switch through ``use_mmfast_attention(model)``."""

from mmfast.integrations.patching import Family
from mmfast.integrations.transformers.lm_attention import patch_decoder_attention


def _prepare(target, handle):
    patch_decoder_attention(target, handle)
    return None  # nothing else to walk


FAMILY = Family(
    "causal_lm",
    model_classes=tuple(f"{arch}{suffix}" for arch in ("Llama", "Qwen2", "Mistral")
                        for suffix in ("ForCausalLM", "Model")),
    prepare=_prepare,
    notes="attention only: norms and MLPs are not replaced yet",
)
