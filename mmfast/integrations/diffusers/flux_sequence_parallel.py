"""``mmfast.patch(flux_transformer, sequence_parallel=group)``: Ulysses sequence parallelism
for diffusers ``FluxTransformer2DModel`` (FLUX.1 dev / schnell / Kontext) and
``Flux2Transformer2DModel`` (FLUX.2), on the design of
mmfast.integrations.diffusers.sequence_parallel: every rank gets the same full inputs and
returns the full single-process output; the tokens are split inside.

Where. ``x_embedder`` returns this rank's chunk of the image tokens (Kontext's and FLUX.2's
reference-image tokens are image tokens: they come appended to ``hidden_states``) and
``context_embedder`` this rank's chunk of the text tokens, each stream padded at its end
when the world size does not divide its length (mmfast.distributed.sequence). The blocks
then run on the chunks: double-stream blocks on (text chunk, image chunk), single-stream
blocks on their concatenation ``[text chunk, image chunk]``, which is exactly the layout
``ulysses_attention`` takes for two streams (``seq_lens=(text, image)``, text first, as
FLUX attends). ``proj_out`` gathers the image tokens back.

Rotary. The table (``image_rotary_emb``: a row per token of text + image) is not split:
every attention hands the whole table to ``ulysses_attention``, which applies it inside
the attention kernel after the all-to-all, when this rank holds every token (in
single-process order) of its heads. So the rows always match the tokens, padding
included (it is cut before the attention), and no rotary pass runs on the chunks.

FLUX.2's forward cuts the text off the single-stream output at the full text length
(``hidden_states[:, num_txt_tokens:]``), not at this rank's chunk: the last block's output
gets its text rows padded to that length (they are dropped right after), so the cut
leaves this rank's image chunk.

Gradients, as for SD3: each rank's parameter gradients are its tokens' share;
``all_reduce`` (SUM) gives the single-process gradient. ControlNet residuals
(``controlnet_block_samples``, ``controlnet_single_block_samples``) are split like the
image tokens. Refused (ValueError): attention processors with no sequence-parallel form
(IP-adapter, FLUX.2's KV-cache ones, custom ones; checked at patch time and on every call),
attention masks, FLUX.2's ``kv_cache`` / ``kv_cache_mode``, and a world size that does
not divide the head count.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmfast.distributed.sequence import shard_length, shard_sequence
from mmfast.distributed.ulysses import ulysses_attention
from mmfast.integrations.diffusers.sequence_parallel import (
    SequenceParallelState, _gather_image_tokens, _inner_forward, _shard_image_tokens, _shard_text_tokens, _wrap,
    check_heads)
from mmfast.integrations.patching import PatchHandle
from mmfast.nn.flux_attention import (
    _heads, _projections, check_no_parallel_config, half_tables, head_rms_norm, pairs_to_halves, split_linear)
from mmfast.ops.activation import swiglu


def _ulysses_attend(state: SequenceParallelState, query_parts, key_parts, value_parts, image_rotary_emb,
                    head_dim: int):
    """Attention of this rank's token chunks ([B, c_i, H, D] each: the text chunk first,
    then the image chunk; or the two already concatenated), over the whole sequence;
    returns this rank's [B, c, H * D]. The rotary table covers the whole sequence."""
    lens = (state.text_tokens, state.image_tokens)
    rotary = None
    if image_rotary_emb is None:
        query, key = torch.cat(query_parts, 1), torch.cat(key_parts, 1)
    else:
        rotary = half_tables(image_rotary_emb, sum(lens), head_dim)
        query, key = pairs_to_halves(query_parts), pairs_to_halves(key_parts)
        rotary = tuple(t.to(query.device) for t in rotary)
    value = value_parts[0] if len(value_parts) == 1 else torch.cat(value_parts, 1)
    return ulysses_attention(query, key, value, state.group, seq_lens=lens, rotary=rotary).flatten(-2)


def _joint_attention(state, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """mmfast.nn.flux_attention.joint_attention on this rank's chunks (see there)."""
    query, key, value, text_query, text_key, text_value = _projections(attn, hidden_states, encoder_hidden_states)
    head_dim = attn.head_dim
    query = head_rms_norm(attn.norm_q, _heads(query, head_dim))
    key = head_rms_norm(attn.norm_k, _heads(key, head_dim))
    value = _heads(value, head_dim)
    if encoder_hidden_states is None:  # a single-stream block: [text chunk, image chunk] in one tensor
        return _ulysses_attend(state, [query], [key], [value], image_rotary_emb, head_dim)
    if attn.added_kv_proj_dim is None:
        raise ValueError("encoder_hidden_states: this FLUX attention has no text projections, so its text "
                         "stream cannot join the sequence-parallel attention")
    text_query = head_rms_norm(attn.norm_added_q, _heads(text_query, head_dim))
    text_key = head_rms_norm(attn.norm_added_k, _heads(text_key, head_dim))
    return _ulysses_attend(state, [text_query, query], [text_key, key], [_heads(text_value, head_dim), value],
                           image_rotary_emb, head_dim)


def _refuse_mask(attention_mask) -> None:
    if attention_mask is not None:
        raise ValueError("attention_mask: the sequence-parallel FLUX processors run attention without a mask only")


class _UlyssesFluxProcessor:
    # What diffusers' set_attention_backend / enable_parallelism set on a processor.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: SequenceParallelState):
        self.state = state


class UlyssesFluxAttnProcessor(_UlyssesFluxProcessor):
    """diffusers ``FluxAttnProcessor`` (FLUX.1 double- and single-stream blocks) over
    sequence chunks: this rank's text and image tokens in, this rank's out."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        _refuse_mask(attention_mask)
        check_no_parallel_config(self)
        out = _joint_attention(self.state, attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = out.to(hidden_states.dtype)
        if encoder_hidden_states is None:
            return out
        text_tokens = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, text_tokens:])), attn.to_add_out(out[:, :text_tokens])


class UlyssesFlux2AttnProcessor(_UlyssesFluxProcessor):
    """diffusers ``Flux2AttnProcessor`` (FLUX.2 double-stream blocks) over sequence chunks."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        _refuse_mask(attention_mask)
        check_no_parallel_config(self)
        out = _joint_attention(self.state, attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = out.to(hidden_states.dtype)
        text = None
        if encoder_hidden_states is not None:
            text_tokens = encoder_hidden_states.shape[1]
            text, out = attn.to_add_out(out[:, :text_tokens]), out[:, text_tokens:]
        image = attn.to_out[1](attn.to_out[0](out))
        return image if text is None else (image, text)


class UlyssesFlux2ParallelSelfAttnProcessor(_UlyssesFluxProcessor):
    """diffusers ``Flux2ParallelSelfAttnProcessor`` (FLUX.2 single-stream blocks: one fused
    input projection to q, k, v and the SwiGLU MLP) over sequence chunks. The MLP is
    token-local; only the attention exchanges tokens."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        _refuse_mask(attention_mask)
        check_no_parallel_config(self)
        projected = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)  # diffusers' split rule
        qkv, mlp = projected[..., :local_qkv], projected[..., local_qkv:]
        query, key, value = (_heads(t, attn.head_dim) for t in qkv.chunk(3, dim=-1))
        query, key = head_rms_norm(attn.norm_q, query), head_rms_norm(attn.norm_k, key)
        out = _ulysses_attend(self.state, [query], [key], [value], image_rotary_emb, attn.head_dim)
        out = out.to(hidden_states.dtype)
        if type(attn.mlp_act_fn).__name__ == "Flux2SwiGLU":
            half = mlp.shape[-1] // 2
            mlp = swiglu(mlp[..., :half], mlp[..., half:])
        else:
            mlp = attn.mlp_act_fn(mlp)
        return split_linear(attn.to_out, out, mlp)


ULYSSES_FLUX_PROCESSORS = (UlyssesFluxAttnProcessor, UlyssesFlux2AttnProcessor, UlyssesFlux2ParallelSelfAttnProcessor)
# processor class name (diffusers' or mmfast's: they share it) -> its sequence-parallel form
_SEQUENCE_PARALLEL_FORM = {
    "FluxAttnProcessor": UlyssesFluxAttnProcessor,
    "Flux2AttnProcessor": UlyssesFlux2AttnProcessor,
    "Flux2ParallelSelfAttnProcessor": UlyssesFlux2ParallelSelfAttnProcessor,
}


def _attentions(model):
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


def _check_processors(model) -> None:
    for name, attn in _attentions(model):
        if not isinstance(attn.processor, ULYSSES_FLUX_PROCESSORS):
            raise ValueError(f"sequence_parallel: attention {name} now runs {type(attn.processor).__name__}, which "
                             "has no sequence-parallel form; undo the patch, set the processor, and patch again")


def _ulysses_processors(model, handle: PatchHandle, state: SequenceParallelState) -> None:
    world = dist.get_world_size(state.group)
    for name, attn in _attentions(model):
        processor = attn.processor
        form = _SEQUENCE_PARALLEL_FORM.get(type(processor).__name__)
        if not type(processor).__module__.startswith(("diffusers.", "mmfast.")):
            form = None  # a user's class of the same name: its semantics are unknown
        if form is None or getattr(processor, "_parallel_config", None) is not None:
            raise ValueError(f"sequence_parallel: attention {name} runs {type(processor).__name__}"
                             f"{' set up for diffusers context parallelism' if form else ''}, which has no "
                             "sequence-parallel form (mmfast takes diffusers' FluxAttnProcessor, Flux2AttnProcessor "
                             "and Flux2ParallelSelfAttnProcessor)")
        check_heads(name, attn.heads, world)
        handle.set_attr(attn, "processor", form(state))
        handle.replaced.append((name, f"{type(processor).__name__} -> Ulysses {form.__name__}"))


def _bound(self, args, kwargs) -> inspect.BoundArguments:
    """The model forward's arguments by name (diffusers' signature)."""
    return inspect.signature(type(self).forward).bind(self, *args, **kwargs)


def _flux_forward(self, *args, **kwargs):
    _check_processors(self)
    bound = _bound(self, args, kwargs)
    group = self._mmfast_sp.group
    for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
        samples = bound.arguments.get(name)
        if samples is not None:  # residuals added to the image tokens: split like them
            bound.arguments[name] = [shard_sequence(s, group) for s in samples]
    return _inner_forward(self, *bound.args[1:], **bound.kwargs)


def _flux2_forward(self, *args, **kwargs):
    _check_processors(self)
    bound = _bound(self, args, kwargs)
    for name in ("kv_cache", "kv_cache_mode"):
        if bound.arguments.get(name) is not None:
            raise ValueError(f"{name}: FLUX.2's reference KV cache is not sequence-parallel; call the model "
                             "without it (reference tokens appended to hidden_states are)")
    return _inner_forward(self, *args, **kwargs)


def _text_at_full_length(text, state: SequenceParallelState):
    """This rank's text chunk [B, c_text, C] padded to the full text length, so that
    diffusers' cut at ``num_txt_tokens`` after the blocks leaves this rank's image chunk.
    Those text rows are dropped right after: their values do not matter."""
    return F.pad(text, (0, 0, 0, state.text_tokens - text.shape[1]))


def _last_single_block(self, *args, **kwargs):
    out = _inner_forward(self, *args, **kwargs)  # [B, c_text + c_image, C]
    state = self._mmfast_sp
    chunk = shard_length(state.text_tokens, dist.get_world_size(state.group))
    return torch.cat([_text_at_full_length(out[:, :chunk], state), out[:, chunk:]], dim=1)


def _last_double_block(self, *args, **kwargs):  # a model without single-stream blocks
    text, image = _inner_forward(self, *args, **kwargs)
    return _text_at_full_length(text, self._mmfast_sp), image


def _common(model, handle: PatchHandle) -> SequenceParallelState:
    state = SequenceParallelState(handle.sequence_parallel)
    _ulysses_processors(model, handle, state)
    _wrap(model.x_embedder, handle, _shard_image_tokens, state, "x_embedder", "image tokens sharded")
    _wrap(model.context_embedder, handle, _shard_text_tokens, state, "context_embedder", "text tokens sharded")
    _wrap(model.proj_out, handle, _gather_image_tokens, state, "proj_out", "image tokens gathered")
    return state


def flux_sequence_parallel(model, handle: PatchHandle) -> None:
    """FluxTransformer2DModel: text and image tokens sharded, joint attention on Ulysses."""
    state = _common(model, handle)
    _wrap(model, handle, _flux_forward, state, "", "sequence parallel (Ulysses)")
    handle.sequence_parallel_models.append(type(model).__name__)


def flux2_sequence_parallel(model, handle: PatchHandle) -> None:
    """Flux2Transformer2DModel: text and image tokens sharded, joint and single-stream
    attention on Ulysses; the last block's text rows padded to the full text length."""
    state = _common(model, handle)
    if len(model.single_transformer_blocks):
        index = len(model.single_transformer_blocks) - 1
        _wrap(model.single_transformer_blocks[index], handle, _last_single_block, state,
              f"single_transformer_blocks.{index}", "text rows at full length")
    elif len(model.transformer_blocks):
        index = len(model.transformer_blocks) - 1
        _wrap(model.transformer_blocks[index], handle, _last_double_block, state, f"transformer_blocks.{index}",
              "text rows at full length")
    else:
        raise ValueError("sequence_parallel: this Flux2Transformer2DModel has no blocks")
    _wrap(model, handle, _flux2_forward, state, "", "sequence parallel (Ulysses)")
    handle.sequence_parallel_models.append(type(model).__name__)
