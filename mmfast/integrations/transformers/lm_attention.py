"""Switch a Hugging Face language model's self-attention to the "mmfast" attention
implementation (see attention_interface.py), per instance and reversibly.

transformers picks each attention module's function from ``module.config._attn_implementation``;
the decoder's mask code reads the same config object. So the switch sets that attribute on
the config objects the decoder's self-attention modules hold, through the PatchHandle
(undo restores the previous value exactly), as transformers' own set_attn_implementation
does. The vision towers hold other config objects and are untouched; but models built
from one config object share it, and so share the switch (transformers does not copy
the config a model is built from).
"""

from __future__ import annotations

from mmfast.integrations.patching import PatchHandle
from mmfast.integrations.transformers.attention_interface import NAME, register

WHAT = "mmfast attention implementation"


def is_decoder_self_attention(module) -> bool:
    """A transformers causal self-attention module that calls the AttentionInterface:
    an ``...Attention`` class with ``is_causal`` True, a ``layer_idx`` and a config."""
    config = getattr(module, "config", None)
    return (type(module).__name__.endswith("Attention") and getattr(module, "is_causal", False) is True
            and hasattr(module, "layer_idx") and hasattr(config, "_attn_implementation"))


def patch_attention_implementation(module, handle: PatchHandle, name: str) -> None:
    """A Replacement row: ``module`` (and every module sharing its config) runs "mmfast"."""
    register()
    config = module.config
    if config._attn_implementation != NAME:
        # The internal attribute: the public setter would also rewrite the sub-configs.
        handle.set_attr(config, "_attn_implementation_internal", NAME)
    handle.replaced.append((name or type(module).__name__, WHAT))


def patch_decoder_attention(root, handle: PatchHandle, prefix: str = "") -> None:
    """Apply :func:`patch_attention_implementation` to every decoder self-attention under ``root``."""
    for name, module in root.named_modules():
        if is_decoder_self_attention(module):
            qualified = ".".join(part for part in (prefix, name) if part)
            patch_attention_implementation(module, handle, qualified)


def use_mmfast_attention(model) -> PatchHandle:
    """Run every decoder self-attention of a transformers model (Llama, Qwen2, Mistral,
    a VLM's language model, ...) on mmfast.ops.attention; returns a handle whose
    ``undo()`` restores the previous implementation exactly.

    Example::

        >>> handle = use_mmfast_attention(model)   # model.generate(...) now runs mmfast
        >>> handle.undo()                          # and now sdpa (or whatever it was) again
    """
    handle = PatchHandle(model, "mmfast-attention")
    try:
        patch_decoder_attention(model, handle)
    except BaseException:
        handle.undo()
        raise
    if not handle.replaced:
        raise TypeError(f"use_mmfast_attention: {type(model).__name__} has no transformers decoder self-attention "
                        "module (an ...Attention with is_causal=True, layer_idx and config)")
    return handle
