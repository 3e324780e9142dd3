"""``mmfast.patch(qwenimage_transformer, sequence_parallel=group)``: Ulysses sequence
parallelism for diffusers ``QwenImageTransformer2DModel``, on the design of
mmfast.integrations.diffusers.sequence_parallel (same full inputs on every rank, the full
output back, the tokens split inside).

Where the tokens are split and joined (the points of diffusers' own context-parallel
plan for Qwen-Image): the first block's inputs, the image and the text tokens, are cut
into this rank's chunk of each stream (padded at the end when the world size does not
divide a token count), and so is every block's per-token modulation index
(``modulate_index``, models with ``zero_cond_t``: Qwen-Image-Edit-2511); ``proj_out`` gathers the image chunks back before diffusers'
unpatchify. The model embeds and normalizes the whole text (``txt_norm``, ``txt_in``) and
builds the rotary tables for the whole sequence on every rank (cheap), so its text-length
bookkeeping is the single-process one. Inside the blocks every layer is token-local
(modulation from the replicated timestep embedding, norms, MLPs) except the joint
attention, which runs ``ulysses_attention`` over [this rank's text tokens, this rank's
image tokens] with the whole joint rotary table (rows of the whole sequence: the rotation
runs after the exchange, inside the attention kernel). ControlNet residuals
(``controlnet_block_samples``) are split like the image tokens.

Refused (ValueError): ``encoder_hidden_states_mask`` (text padding; Ulysses attention
takes no mask: pass prompts of one length, or none, as QwenImagePipeline does for a
single prompt), an attention processor changed after patching, and a world size that
does not divide the head count.
"""

from __future__ import annotations

import torch.distributed as dist

from mmfast.distributed.sequence import shard_sequence
from mmfast.distributed.ulysses import ulysses_attention
from mmfast.integrations.diffusers.sequence_parallel import (
    SequenceParallelState, _gather_image_tokens, check_heads, _inner_forward, _wrap)
from mmfast.integrations.patching import PatchHandle
from mmfast.nn.qwenimage_transformer import qwen_attention_forward

_TAKEN = ("QwenDoubleStreamAttnProcessor2_0", "QwenDoubleStreamAttnProcessor")


class UlyssesQwenAttnProcessor:
    """diffusers ``QwenDoubleStreamAttnProcessor2_0`` over sequence shards: this rank's
    image and text tokens in, this rank's out, attention over the whole joint sequence."""

    def __init__(self, state: SequenceParallelState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or attention_mask is not None or encoder_hidden_states_mask is not None:
            raise ValueError("encoder_hidden_states, encoder_hidden_states_mask, attention_mask: the "
                             "sequence-parallel processor runs Qwen-Image's joint attention without a mask only")
        state = self.state
        tokens = (state.text_tokens, state.image_tokens)

        def attend(query, key, value, rotary):
            return ulysses_attention(query, key, value, state.group, seq_lens=tokens, rotary=rotary)

        return qwen_attention_forward(attn, hidden_states, encoder_hidden_states, image_rotary_emb, attend=attend,
                                      tokens=tokens)


def _attentions(model):
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "set_processor") and getattr(m, "processor", None) is not None]


def _shard_block_inputs(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                        image_rotary_emb=None, joint_attention_kwargs=None, modulate_index=None):
    """The first block cuts the image and text tokens; every block cuts the per-token
    modulation index (zero_cond_t) like the image tokens."""
    state = self._mmfast_sp
    if getattr(self, "_mmfast_sp_first", False):
        state.image_tokens, state.text_tokens = hidden_states.shape[1], encoder_hidden_states.shape[1]
        hidden_states = shard_sequence(hidden_states, state.group)
        encoder_hidden_states = shard_sequence(encoder_hidden_states, state.group)
    if modulate_index is not None:
        modulate_index = shard_sequence(modulate_index, state.group)
    return _inner_forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                          image_rotary_emb, joint_attention_kwargs, modulate_index)


def _qwenimage_forward(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                       timestep=None, img_shapes=None, guidance=None, attention_kwargs=None,
                       controlnet_block_samples=None, additional_t_cond=None, return_dict=True):
    if encoder_hidden_states_mask is not None:
        raise ValueError("encoder_hidden_states_mask: not taken under sequence_parallel (Ulysses attention takes "
                         "no mask); pass prompts without padding, or patch without sequence_parallel")
    for name, attn in _attentions(self):
        if not isinstance(attn.processor, UlyssesQwenAttnProcessor):
            raise ValueError(f"sequence_parallel: attention {name} now runs {type(attn.processor).__name__}, which "
                             "has no sequence-parallel form; undo the patch, set the processor, and patch again")
    if controlnet_block_samples is not None:
        group = self._mmfast_sp.group
        controlnet_block_samples = [shard_sequence(r, group) for r in controlnet_block_samples]
    return _inner_forward(self, hidden_states, encoder_hidden_states, None, timestep, img_shapes, guidance,
                          attention_kwargs, controlnet_block_samples, additional_t_cond, return_dict)


def qwenimage_sequence_parallel(model, handle: PatchHandle) -> None:
    """QwenImageTransformer2DModel: text and image tokens sharded, joint attention on Ulysses."""
    if not len(model.transformer_blocks):
        raise ValueError("sequence_parallel: a QwenImageTransformer2DModel without transformer blocks has no "
                         "attention to split")
    state = SequenceParallelState(handle.sequence_parallel)
    world = dist.get_world_size(state.group)
    for name, attn in _attentions(model):
        processor = type(attn.processor).__name__
        # A user's class of the same name has unknown semantics; one set up for diffusers'
        # context parallelism would lose that setup.
        known = processor in _TAKEN and type(attn.processor).__module__.startswith(("diffusers.", "mmfast."))
        parallel = getattr(attn.processor, "_parallel_config", None) is not None
        if not known or parallel:
            raise ValueError(f"sequence_parallel: attention {name} runs {processor}"
                             f"{' set up for diffusers context parallelism' if parallel else ''}, which has no "
                             "sequence-parallel form (mmfast takes diffusers' QwenDoubleStreamAttnProcessor2_0)")
        check_heads(name, attn.heads, world)
        handle.set_attr(attn, "processor", UlyssesQwenAttnProcessor(state))
        handle.replaced.append((name, f"{processor} -> Ulysses UlyssesQwenAttnProcessor"))
    handle.set_attr(model.transformer_blocks[0], "_mmfast_sp_first", True)
    for index, block in enumerate(model.transformer_blocks):
        what = "image and text tokens sharded" if index == 0 else "modulation index sharded (zero_cond_t)"
        _wrap(block, handle, _shard_block_inputs, state, f"transformer_blocks.{index}", what)
    _wrap(model.proj_out, handle, _gather_image_tokens, state, "proj_out", "image tokens gathered")
    _wrap(model, handle, _qwenimage_forward, state, "", "sequence parallel (Ulysses)")
    handle.sequence_parallel_models.append(type(model).__name__)
