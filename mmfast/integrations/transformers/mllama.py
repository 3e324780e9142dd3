"""Llama 3.2 Vision (MllamaForConditionalGeneration, MllamaModel, MllamaForCausalLM,
MllamaTextModel): each cross-attention decoder layer runs mmfast's cross_attention with
its tanh gate in the kernel's epilogue and the residual on the output GEMM.

The layer receives Hugging Face's dense additive mask [B, 1, T, K]. It is converted, once
per forward (the same tensor reaches every layer; the result is cached on it by identity
and version), into a :class:`KeyStartMask`: key j's start is the first text row that sees
it. The conversion is checked against the dense mask (one device sync per forward); a
mask that is not of Mllama's "images up to the position" form keeps Hugging Face's own
forward. Attention dropout in training runs in mmfast's kernel (its own masks, not
Hugging Face's). Text rows that see no image attend to every key, as Hugging Face's
zeroed mask makes them.

Images and tiles: transformers hands the layer the image states as [B * images * tiles,
patches, C] (the vision tower's batch axes folded together); the keys of one text row
are all of its images' tiles' patches, so they are regrouped as [B, images * tiles *
patches, C], as Hugging Face's ``view(bsz, -1, ...)`` does.

With a KV cache (generation) the image keys and values are written to the cache at the
step that brings the images, and read from it at the steps that do not, as in Hugging
Face's layer; the attention itself runs on mmfast in both. Calls that ask for attention
weights keep Hugging Face's forward (mmfast does not return them).
"""

from __future__ import annotations

import inspect
import weakref

import torch

from mmfast.integrations.patching import Family, Replacement
from mmfast.integrations.transformers._outputs import asked
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
    cache = _kv_cache(given)
    if asked(self.cross_attn, given, "attentions") or (cross_attention_states is None and cache is None):
        return original(self, *args, **kwargs)
    kv = _image_keys_values(self, hidden_states.shape[0], cross_attention_states, cache, given)
    if kv is None:
        return original(self, *args, **kwargs)
    k, v = kv
    mask = None
    if cross_attention_mask is not None:
        if full_text_row_masked_out_mask is None:
            return original(self, *args, **kwargs)
        mask = key_start_mask(cross_attention_mask, full_text_row_masked_out_mask,
                              hidden_states[..., None], k[..., 0, :1])
        if mask is None:
            return original(self, *args, **kwargs)
    sees_any = full_text_row_masked_out_mask[:, 0] if full_text_row_masked_out_mask is not None else None
    return gated_cross_attention_forward(self, hidden_states, k, v, mask, sees_any)


def _image_keys_values(layer, batch, cross_attention_states, cache, given):
    """(k, v) [B, Ti, Hk, D] for this call: projected from the image states (images and
    tiles regrouped per text row; written to the cache if there is one), or read from the
    cache; None where the cache holds nothing for this layer (Hugging Face's forward then
    raises what it raises)."""
    idx = layer.cross_attn.layer_idx
    if cross_attention_states is not None:
        if cross_attention_states.dim() != 3 or cross_attention_states.shape[0] % batch:
            raise ValueError(f"cross_attention_states: expected [B * images * tiles, patches, C] with B = {batch} "
                             f"text rows, got {tuple(cross_attention_states.shape)}")
        k, v = project_image(layer.cross_attn, cross_attention_states.reshape(batch, -1,
                                                                              cross_attention_states.shape[-1]))
        if cache is None:
            return k, v
        extra = {key: value for key, value in given.items() if key not in _LAYER_ARGUMENTS}
        keys, values = cache.update(k.transpose(1, 2), v.transpose(1, 2), idx, kwargs=extra)
    else:
        layers = getattr(cache, "layers", None)
        if layers is None or idx >= len(layers) or getattr(layers[idx], "keys", None) is None:
            return None
        keys, values = layers[idx].keys, layers[idx].values
    return keys.transpose(1, 2), values.transpose(1, 2)


_LAYER_ARGUMENTS = ("self", "hidden_states", "cross_attention_states", "cross_attention_mask", "attention_mask",
                    "full_text_row_masked_out_mask", "position_ids", "cache", "past_key_values", "use_cache",
                    "position_embeddings")


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
