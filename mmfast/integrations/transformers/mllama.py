"""Llama 3.2 Vision (MllamaForConditionalGeneration, MllamaModel, MllamaForCausalLM,
MllamaTextModel): each cross-attention decoder layer runs mmfast's cross_attention with
its tanh gate in the kernel's epilogue and the residual on the output GEMM.

The layer receives Hugging Face's dense additive mask [B, 1, T, K]. It is converted, once
per forward (the same tensor reaches every layer; the result is cached on it by identity
and version), into a :class:`KeyStartMask`: key j's start is the first text row that sees
it. The conversion is checked against the dense mask (one device sync per forward); a
mask that is not of Mllama's "images up to the position" form keeps Hugging Face's own
forward, as do calls with a KV cache (generation). Attention dropout in training runs in
mmfast's kernel (its own masks, not Hugging Face's).
Text rows that see no image attend to every key, as Hugging Face's zeroed mask makes them.
"""

from __future__ import annotations

import inspect
import weakref

import torch

from mmfast.integrations.patching import Family, Replacement
from mmfast.nn.gated_cross_attention import gated_cross_attention_forward, project_image
from mmfast.ops.cross_attention_masks import KeyStartMask

# The last conversion: (weak reference to the dense mask, its version, the result). A weak
# reference, so that a new mask that reuses a freed one's address is never mistaken for it.
_last: list = [None, -1, None]


def key_start_mask(additive_mask, sees_any, text, image):
    """KeyStartMask equal to HF's additive mask [B, 1, T, K], or None if none is."""
    ref, version, cached = _last
    if ref is not None and ref() is additive_mask and version == additive_mask._version:
        return cached
    visible = additive_mask[:, 0] == 0  # [B, T, K]; rows that see nothing were zeroed: all True
    real = visible & sees_any[:, 0, :, :].bool()
    start = torch.where(real.any(1), real.int().argmax(1), -1)  # first row that sees key j
    mask = KeyStartMask(start, empty_rows_see_all_keys=True)
    if not torch.equal(mask.materialize(text, image), visible):
        mask = None
    _last[:] = [weakref.ref(additive_mask), additive_mask._version, mask]
    return mask


def _layer_forward(self, *args, **kwargs):
    original = type(self).forward
    given = _bind(original, self, args, kwargs)
    hidden_states = given["hidden_states"]
    cross_attention_states = given.get("cross_attention_states")
    cross_attention_mask = given.get("cross_attention_mask")
    full_text_row_masked_out_mask = given.get("full_text_row_masked_out_mask")
    if _kv_cache(given) is not None or cross_attention_states is None:
        return original(self, *args, **kwargs)
    mask = None
    if cross_attention_mask is not None:
        if full_text_row_masked_out_mask is None:
            return original(self, *args, **kwargs)
        mask = key_start_mask(cross_attention_mask, full_text_row_masked_out_mask,
                              hidden_states[..., None], cross_attention_states[..., None])
        if mask is None:
            return original(self, *args, **kwargs)
    k, v = project_image(self.cross_attn, cross_attention_states)
    sees_any = full_text_row_masked_out_mask[:, 0] if full_text_row_masked_out_mask is not None else None
    return gated_cross_attention_forward(self, hidden_states, k, v, mask, sees_any)


def _bind(function, self, args, kwargs) -> dict:
    """The call's arguments by the name the installed transformers gives them (names and
    order of the layer's forward differ between releases)."""
    signature = _signatures.get(function)
    if signature is None:
        signature = _signatures[function] = inspect.signature(function)
    arguments = signature.bind(self, *args, **kwargs).arguments
    extra = next((name for name, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)
    return {**arguments.pop(extra, {}), **arguments} if extra else arguments


_signatures: dict = {}


def _kv_cache(given: dict):
    # Older transformers releases name the KV cache `past_key_values`, newer ones `cache`.
    cache = given.get("cache")
    return cache if cache is not None else given.get("past_key_values")


def _patch_layer(module, handle, name):
    handle.set_forward(module, _layer_forward, "gated cross_attention", name)


FAMILY = Family(
    "mllama",
    model_classes=("MllamaForConditionalGeneration", "MllamaModel", "MllamaForCausalLM", "MllamaTextModel"),
    replacements=(Replacement(("MllamaCrossAttentionDecoderLayer",), _patch_layer, "gated cross_attention"),),
)
