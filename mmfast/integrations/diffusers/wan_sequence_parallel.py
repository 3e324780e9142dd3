"""``mmfast.patch(wan_transformer, sequence_parallel=group)``: Ulysses sequence
parallelism for diffusers ``WanTransformer3DModel``, on the design of
mmfast.integrations.diffusers.sequence_parallel (same full inputs on every rank, the full
output back, the video tokens split inside).

Where the tokens are split and joined (the points of diffusers' own context-parallel
plan for Wan): the rotary tables (``rope``'s output) and the first block's input
``hidden_states`` are cut into this rank's chunk (padded at the end when the world size
does not divide the token count); ``proj_out`` gathers the chunks back before diffusers'
unpatchify. Inside the blocks every layer is token-local (modulation from the replicated
timestep embedding, norms, the feed-forward) except the self-attention, which runs on
``ulysses_attention`` after rotating this rank's q and k with this rank's rows of the
tables. The cross-attention to the text (and I2V's image context) needs no exchange: its
queries are this rank's tokens, its keys the whole (replicated) context.

Refused (ValueError): Wan 2.2 TI2V's per-token timesteps (``timestep`` [B, T]: the final
modulation is per token and would need splitting too), a self-attention processor
changed after patching, and attention masks on the self-attention.
"""

from __future__ import annotations

from functools import partial

import torch.distributed as dist

from mmfast.distributed.sequence import shard_sequence
from mmfast.distributed.ulysses import ulysses_attention
from mmfast.integrations.diffusers.sequence_parallel import (
    SequenceParallelState, _gather_image_tokens, check_heads, _inner_forward, _wrap)
from mmfast.integrations.patching import PatchHandle
from mmfast.nn.wan_transformer import wan_attention_forward


class UlyssesWanAttnProcessor:
    """diffusers ``WanAttnProcessor`` self-attention over sequence shards: this rank's
    video tokens in (and its rows of the rotary tables), this rank's out."""

    def __init__(self, state: SequenceParallelState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("encoder_hidden_states, attention_mask: the sequence-parallel processor runs "
                             "Wan's self-attention without a mask only")
        attend = partial(ulysses_attention, group=self.state.group, seq_lens=self.state.image_tokens)
        return wan_attention_forward(attn, hidden_states, None, rotary_emb, attend=attend)


def _shard_rotary(self, *args, **kwargs):
    cos, sin = _inner_forward(self, *args, **kwargs)
    group = self._mmfast_sp.group
    return shard_sequence(cos, group), shard_sequence(sin, group)


def _shard_first_block_input(self, hidden_states, *args, **kwargs):
    self._mmfast_sp.image_tokens = hidden_states.shape[1]
    return _inner_forward(self, shard_sequence(hidden_states, self._mmfast_sp.group), *args, **kwargs)


def _self_attentions(model):
    return [(name, m) for name, m in model.named_modules()
            if type(m).__name__ == "WanAttention" and not m.is_cross_attention]


def _wan_forward(self, hidden_states, timestep, *args, **kwargs):
    if timestep.ndim != 1:
        raise ValueError(f"timestep: expected [B] (one timestep per sample) under sequence_parallel, got shape "
                         f"{tuple(timestep.shape)}; per-token timesteps (Wan 2.2 TI2V) are not sequence-parallel")
    for name, attn in _self_attentions(self):
        if not isinstance(attn.processor, UlyssesWanAttnProcessor):
            raise ValueError(f"sequence_parallel: attention {name} now runs {type(attn.processor).__name__}, which "
                             "has no sequence-parallel form; undo the patch, set the processor, and patch again")
    return _inner_forward(self, hidden_states, timestep, *args, **kwargs)


def wan_sequence_parallel(model, handle: PatchHandle) -> None:
    """WanTransformer3DModel: video tokens sharded, self-attention on Ulysses."""
    state = SequenceParallelState(handle.sequence_parallel)
    world = dist.get_world_size(state.group)
    for name, attn in _self_attentions(model):
        processor = type(attn.processor).__name__
        if processor not in ("WanAttnProcessor", "FusedWanAttnProcessor"):
            raise ValueError(f"sequence_parallel: attention {name} runs {processor}, which has no sequence-parallel "
                             "form (mmfast takes diffusers' WanAttnProcessor)")
        check_heads(name, attn.heads, world)
        handle.set_attr(attn, "processor", UlyssesWanAttnProcessor(state))
        handle.replaced.append((name, f"{processor} -> Ulysses UlyssesWanAttnProcessor"))
    _wrap(model.rope, handle, _shard_rotary, state, "rope", "rotary tables sharded")
    _wrap(model.blocks[0], handle, _shard_first_block_input, state, "blocks.0", "video tokens sharded")
    _wrap(model.proj_out, handle, _gather_image_tokens, state, "proj_out", "video tokens gathered")
    _wrap(model, handle, _wan_forward, state, "", "sequence parallel (Ulysses)")
    handle.sequence_parallel_models.append(type(model).__name__)
