"""mmfast attention as a transformers attention implementation, named ``"mmfast"``.

transformers 5 looks attention up by name (``config._attn_implementation``) in two
registries: ``AttentionInterface`` (the function each attention module calls) and
``AttentionMaskInterface`` (how the model builds the mask it hands to that function).
:func:`register` adds ``"mmfast"`` to both, so that every decoder written against the
interface (Llama, Qwen2, Mistral, the Qwen2-VL / Qwen2.5-VL text models, ...) runs its
self-attention on :func:`mmfast.ops.attention`::

    register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="mmfast")
    model.set_attn_implementation("mmfast")        # or, per instance and reversible:
    handle = use_mmfast_attention(model)           # (mmfast.integrations.transformers)

Masks are built flash-attention style, so no dense [B, 1, Tq, Tk] mask is ever made:
``None`` when nothing is padded (causality and sliding windows are the module's), else
the 2D [B, Tk] padding mask. The attention function then takes one of these paths:

- no mask: padded ``attention(q, k, v, causal=module.is_causal)``. mmfast aligns a
  causal mask bottom-right as flash-attn does, so decode with a KV cache (Tq < Tk) is
  right: the queries are the newest Tq tokens.
- a 2D padding mask: the valid tokens are gathered into packed varlen segments
  (cu_seqlens from the mask), run, and scattered back; padded query rows get 0, as with
  flash-attn. Gathering costs one device->host sync (``nonzero``), shared by all layers
  of a forward (the result is kept for the last mask seen); max_seqlen is bounded by the
  padded lengths, so it costs none. Decode (Tq = 1) needs no sync for the queries;
  chunked prefill into a cache (1 < Tq < Tk) syncs once more per layer for them.
- a decode step (Tq = 1, no sliding window), padded or not: the one query sees every key,
  so it runs as :func:`mmfast.ops.cross_attention`, whose kernels split the keys over
  programs (flash-decoding).
- packed sequences in one row (B = 1): ``cu_seq_lens_q/k`` and ``max_length_q/k``
  kwargs (DataCollatorWithFlattening) are used as given, with no sync; otherwise packing
  is detected from ``position_ids`` (a new segment where positions do not step by 1, as
  transformers' mask code does), one sync per forward.

Sliding windows (the ``sliding_window`` kwarg: the query and the sliding_window - 1 keys
before it) map to mmfast's window; GQA/MQA is native. Attention dropout (``dropout`` > 0:
transformers passes it in training only) is mmfast's own (its Philox mask, drawn from
torch's default generator; not the mask sdpa would draw). What mmfast cannot compute
exactly raises NotImplementedError: logit softcapping, attention sinks
(``s_aux``/``sinks``), additive position biases, paged caches, a sliding window on
non-causal attention, different K and V head dims. Mask patterns that are not plain
causal / sliding / packed (bidirectional image-token overlays, chunked attention, custom
4D masks) are built dense by transformers' sdpa code and run by its sdpa attention,
logged once: correct, not accelerated.
"""

from __future__ import annotations

import logging
import weakref
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.ops.attention import attention
from mmfast.ops.cross_attention import cross_attention

NAME = "mmfast"
logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def register() -> None:
    """Register ``"mmfast"`` with transformers' AttentionInterface and
    AttentionMaskInterface. Idempotent; imports transformers only when called."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, mmfast_attention_forward)
    AttentionMaskInterface.register(NAME, mmfast_attention_mask)


# ---- masks ---------------------------------------------------------------------------


def _closure(fn) -> dict:
    cells = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


def _is_local(fn, factory: str) -> bool:
    return getattr(fn, "__qualname__", "") == f"{factory}.<locals>.inner_mask"


def _mask_pattern(mask_function) -> str | None:
    """What transformers' mask function asks for, if it is one the flash-style path
    covers: "causal", "sliding" (sliding_window_causal_mask_function), or "packed" (one
    of those two behind packed_sequence_compatibility_function); None otherwise."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is causal_mask_function:
        return "causal"
    parts = _closure(mask_function).get("mask_functions")
    if not (isinstance(parts, tuple) and len(parts) == 2):
        return None
    # The order of the two parts differs between transformers releases.
    overlay = next((p for p in parts if _is_local(p, "sliding_window_overlay")), None)
    if overlay is not None and any(p is causal_mask_function for p in parts):
        return "sliding"
    # Packing: causal or sliding AND same-segment; the causal part may come wrapped in a
    # remap of positions to per-segment ones (some releases), which changes no distance.
    rest = [p for p in parts if not _is_local(p, "packed_sequence_mask_function")]
    if len(rest) == 1:
        (inner,) = rest
        if _is_local(inner, "remap_positions_for_packed_sequence"):
            inner = _closure(inner).get("mask_function")
        if _mask_pattern(inner) in ("causal", "sliding"):
            return "packed"
    return None


def mmfast_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                          mask_function=None, attention_mask: Tensor | None = None, **kwargs):
    """The mask function registered as "mmfast" (called by transformers' create_causal_mask
    and friends): None or the 2D [B, Tk] padding mask, as for flash-attention. Other mask
    patterns get transformers' dense boolean sdpa mask (mmfast_attention_forward then runs
    sdpa)."""
    from transformers.masking_utils import causal_mask_function, flash_attention_mask, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    pattern = _mask_pattern(mask_function)
    if pattern is not None and not (pattern == "packed" and batch_size != 1):
        return flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                    mask_function=mask_function, attention_mask=attention_mask)
    _log_once("mmfast attention: a mask pattern other than causal/sliding/packed-in-one-row is built dense "
              "and runs on transformers' sdpa attention")
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    # Never skipped: the attention function must see a mask to know to hand it to sdpa.
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


# ---- per-forward memo (every layer of a forward gets the same mask / position_ids) ----


class _LastResult:
    """Remembers ``compute(tensor)`` for the last tensor seen (by identity and version), so
    that the sync it costs is paid once per forward, not once per layer."""

    def __init__(self):
        self._entry = None  # (weakref to the tensor, its version, the result): swapped whole

    def get(self, tensor: Tensor, compute):
        try:
            version = tensor._version
        except RuntimeError:  # inference-mode tensors have no version counter
            return compute(tensor)
        entry = self._entry
        if entry is not None and entry[0]() is tensor and entry[1] == version:
            return entry[2]
        result = compute(tensor)
        self._entry = (weakref.ref(tensor), version, result)
        return result


_unpad_memo = _LastResult()
_packing_memo = _LastResult()


def _unpad_data(mask: Tensor):
    """(flat indices of the valid tokens, int32 cu_seqlens) of a [B, T] padding mask; one sync."""
    lengths = mask.sum(-1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return mask.flatten().nonzero().squeeze(1), cu_seqlens


def _packed_cu_seqlens(position_ids: Tensor):
    """int32 cu_seqlens of the segments of one row of position ids (a segment starts where
    the position does not follow the previous by 1), or None if there is one; one sync."""
    positions = position_ids.reshape(-1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = positions[1:] - positions[:-1] != 1
    start_index = starts.nonzero().squeeze(1)
    if start_index.numel() == 1:
        return None
    end = torch.tensor([positions.numel()], device=positions.device)
    return torch.cat([start_index, end]).to(torch.int32)


# ---- the attention function ------------------------------------------------------------


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"mmfast attention implementation: {what} is not supported; "
                               "use attn_implementation='sdpa' or 'eager' for this model")


def _window(sliding_window, causal: bool) -> tuple[int, int]:
    if sliding_window is None:
        return (-1, -1)
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window: expected None or an int >= 1, got {sliding_window!r}")
    if not causal:
        raise _unsupported("sliding_window on non-causal attention")
    return (sliding_window - 1, 0)  # the query and the sliding_window - 1 keys before it


def _check_inputs(query, key, value, attention_mask, scaling) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a [B, heads, T, D] tensor, got {shape}")
    if key.shape[-1] != value.shape[-1]:
        raise _unsupported(f"value head dim {value.shape[-1]} != key head dim {key.shape[-1]}")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() not in (2, 4)):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask: expected None, a [B, Tk] padding mask or a 4D mask, got {shape}")
    if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, Real)):
        raise TypeError(f"scaling: expected None or a float, got {type(scaling).__name__}")


def mmfast_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                             dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function: query [B, H, Tq, D], key/value [B, Hkv, Tk, D] ->
    (out [B, Tq, H, D] contiguous, in query's dtype, None), as sdpa_attention_forward."""
    _check_inputs(query, key, value, attention_mask, scaling)
    if softcap is not None:
        raise _unsupported("softcap (logit softcapping)")
    for name in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise _unsupported(name)
    if kwargs.get("cache") is not None:
        raise _unsupported("a paged cache (continuous batching)")
    if kwargs.get("output_attentions"):
        _log_once("mmfast attention does not return attention weights (output_attentions=True gives None)")
    if attention_mask is not None and attention_mask.dim() == 4:
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              is_causal=is_causal, **kwargs)

    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    options = {"causal": causal, "window": _window(sliding_window, causal), "scale": scaling, "dropout_p": dropout}
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, T, heads, D] views
    if attention_mask is not None:
        out = _attend_padded_batch(q, k, v, attention_mask, options)
    else:
        out = _attend_packed_row(q, k, v, kwargs, options)
        if out is None and _sees_every_key(q.shape[1], options):
            out = cross_attention(q, k, v, scale=scaling, dropout_p=dropout)
        elif out is None:
            out = attention(q, k, v, **options)
    return out.contiguous(), None


def _sees_every_key(tokens_q: int, options) -> bool:
    """A decode step (one query per row, no window) sees every key, causal or not: that is
    cross-attention, whose kernels split the keys over programs (flash-decoding) where
    attention's would run one program per row and head."""
    return tokens_q == 1 and options["window"] == (-1, -1)


def _sdpa_fallback(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _log_once("mmfast attention: a 4D attention mask runs on transformers' sdpa attention")
    return sdpa_attention_forward(*args, **kwargs)


def _attend_packed_row(q, k, v, kwargs, options):
    """Packed sequences in one row, from cu_seq_lens kwargs or position_ids; None if not packed."""
    batch, tokens = q.shape[:2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        # Ints are used as given; tensors would need a sync, so the padded length bounds them.
        max_q = max_q if isinstance(max_q, int) else tokens
        max_k = max_k if isinstance(max_k, int) else k.shape[1]
        if batch != 1:
            q, k, v = (t.reshape(1, -1, *t.shape[2:]) for t in (q, k, v))
    else:
        position_ids = kwargs.get("position_ids")
        if batch != 1 or tokens == 1 or k.shape[1] != tokens or not isinstance(position_ids, Tensor) \
                or position_ids.numel() != tokens:
            return None
        cu_q = _packing_memo.get(position_ids, _packed_cu_seqlens)
        if cu_q is None:
            return None
        cu_k, max_q, max_k = cu_q, tokens, tokens
    out = attention(q[0], k[0], v[0], cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32),
                    max_seqlen_q=max_q, max_seqlen_k=max_k, **options)
    return out.reshape(batch, -1, *out.shape[1:])


def _attend_padded_batch(q, k, v, mask: Tensor, options):
    """Gather the valid tokens of a padded batch into varlen segments, attend, scatter back."""
    batch, tokens_q, heads, dim = q.shape
    if mask.shape[0] != batch:
        raise ValueError(f"attention_mask: expected batch {batch}, got shape {tuple(mask.shape)}")
    if k.shape[1] > mask.shape[1]:  # a static cache longer than what was written: drop the rest
        k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
    tokens_k = k.shape[1]
    if mask.shape[1] != tokens_k or tokens_q > tokens_k:
        raise ValueError(f"attention_mask: expected [B, Tk] with Tk = {tokens_k} >= Tq = {tokens_q} "
                         f"(the keys' length), got {tuple(mask.shape)}")
    mask = mask.bool()
    index_k, cu_k = _unpad_memo.get(mask, _unpad_data)
    if tokens_q == tokens_k:
        index_q, cu_q = index_k, cu_k
    elif tokens_q == 1:  # decode: one query per row, no sync
        index_q = torch.arange(batch, device=q.device)
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    else:  # the queries are the newest tokens
        index_q, cu_q = _unpad_data(mask[:, -tokens_q:])
    packed_q = q.reshape(-1, heads, dim).index_select(0, index_q)
    packed_k, packed_v = (t.reshape(-1, *t.shape[2:]).index_select(0, index_k) for t in (k, v))
    varlen = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=tokens_q, max_seqlen_k=tokens_k)
    if _sees_every_key(tokens_q, options):
        out = cross_attention(packed_q, packed_k, packed_v, scale=options["scale"], dropout_p=options["dropout_p"],
                              **varlen)
    else:
        out = attention(packed_q, packed_k, packed_v, **varlen, **options)
    padded = out.new_zeros(batch * tokens_q, heads, dim).index_copy(0, index_q, out)
    return padded.view(batch, tokens_q, heads, dim)
