"""``mmfast.patch(model, sequence_parallel=group)`` for diffusers DiTs: Ulysses sequence
parallelism (mmfast.distributed.ulysses_attention) inside an unchanged diffusers forward.

Design. Every rank of the group calls the patched model as a user calls the unpatched
one, with the same full inputs, and gets the full single-process output; the sequence is
split inside. Where:

- the patch embedding (``pos_embed``) runs on the whole latent on every rank (one conv)
  and returns only this rank's chunk of the image tokens; SD3's ``context_embedder``
  likewise returns this rank's chunk of the text tokens. Token counts that the world size
  does not divide are padded at the end of each stream (mmfast.distributed.sequence);
- the whole block stack then runs on the chunks: every layer but attention works token by
  token (adaLN modulation from the replicated timestep embedding, MLPs, norms), and each
  attention runs the Ulysses processor (all-to-all to heads, attention over the whole
  image + text sequence, all-to-all back), which keeps the padding out;
- the output projection (SD3's ``proj_out``, DiT's ``proj_out_2``) gathers the image
  tokens back (all_gather), and diffusers' own unpatchify makes the full output.

So activations and attention work are divided by the world size; the embeddings and the
unpatchify are replicated (they are cheap). Sharding the whole block stack, not each
attention call, keeps one pair of all-to-alls per attention as the only communication
inside the blocks. Every rank must get the same inputs: a pipeline patched this way runs
its whole denoising loop on every rank, so give every rank the same generator seed; each
rank decodes the (identical) latents too.

Gradients: each rank's gradient of a parameter (or of the input) is the share of its own
tokens; ``all_reduce`` (SUM) over the group gives the single-process gradient (see
mmfast.distributed.sequence). ControlNet residuals (``block_controlnet_hidden_states``)
are split like the image tokens. Not taken: attention processors mmfast has no
sequence-parallel form for (IP-Adapter, custom ones, cross-attention, attention with a
norm over all tokens; checked on every call, so one set after patching raises instead
of attending to a chunk only) and attention masks.
"""

from __future__ import annotations

from functools import partial

import torch.distributed as dist

from mmfast.distributed.sequence import gather_sequence, shard_sequence
from mmfast.distributed.ulysses import ulysses_attention
from mmfast.integrations.patching import PatchHandle
from mmfast.nn.diffusion_attention import attention_forward, joint_attention_forward


class SequenceParallelState:
    """The group and the true token counts of the current call, shared by one model's
    patched modules. A deep copy of the model shares the group (process groups do not copy)."""

    def __init__(self, group):
        self.group = group
        self.image_tokens = 0
        self.text_tokens = 0

    def __deepcopy__(self, memo):
        return SequenceParallelState(self.group)


class UlyssesJointAttnProcessor:
    """diffusers ``JointAttnProcessor2_0`` semantics over sequence shards: this rank's image
    (and text) tokens in, this rank's out, attention over the whole sequence."""

    def __init__(self, state: SequenceParallelState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("attention_mask: JointAttnProcessor2_0 ignores it; so that nothing is "
                             "silently dropped, the mmfast processor refuses one")
        state = self.state
        lens = (state.image_tokens,) if encoder_hidden_states is None else (state.image_tokens, state.text_tokens)
        attend = partial(ulysses_attention, group=state.group, seq_lens=lens)
        return joint_attention_forward(attn, hidden_states, encoder_hidden_states, attend=attend)


class UlyssesAttnProcessor:
    """diffusers ``AttnProcessor2_0`` self-attention (DiT) over sequence shards."""

    def __init__(self, state: SequenceParallelState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("encoder_hidden_states, attention_mask: the sequence-parallel processor runs "
                             "self-attention without a mask only")
        attend = partial(ulysses_attention, group=self.state.group, seq_lens=self.state.image_tokens)
        return attention_forward(attn, hidden_states, temb=temb, attend=attend)


ULYSSES_PROCESSORS = (UlyssesJointAttnProcessor, UlyssesAttnProcessor)
# the processor class (diffusers' or mmfast's) -> its sequence-parallel form
_SEQUENCE_PARALLEL_FORM = {
    "JointAttnProcessor2_0": UlyssesJointAttnProcessor,
    "JointAttnProcessor": UlyssesJointAttnProcessor,
    "AttnProcessor2_0": UlyssesAttnProcessor,
    "AttnProcessor": UlyssesAttnProcessor,
}


def _inner_forward(self, *args, **kwargs):
    """The module's forward as it was before the sequence-parallel wrapper."""
    inner = self._mmfast_sp_inner
    return inner(*args, **kwargs) if inner is not None else type(self).forward(self, *args, **kwargs)


def _wrap(module, handle: PatchHandle, forward, state, name: str, what: str) -> None:
    handle.set_attr(module, "_mmfast_sp_inner", module.__dict__.get("forward"))
    handle.set_attr(module, "_mmfast_sp", state)
    handle.set_forward(module, forward, what, name)


def _shard_image_tokens(self, *args, **kwargs):
    tokens = _inner_forward(self, *args, **kwargs)
    self._mmfast_sp.image_tokens = tokens.shape[1]
    return shard_sequence(tokens, self._mmfast_sp.group)


def _shard_text_tokens(self, *args, **kwargs):
    tokens = _inner_forward(self, *args, **kwargs)
    self._mmfast_sp.text_tokens = tokens.shape[1]
    return shard_sequence(tokens, self._mmfast_sp.group)


def _gather_image_tokens(self, *args, **kwargs):
    state = self._mmfast_sp
    return gather_sequence(_inner_forward(self, *args, **kwargs), state.image_tokens, state.group)


def _check_processors(model) -> None:
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(module, "set_processor") and not isinstance(processor, ULYSSES_PROCESSORS):
            raise ValueError(f"sequence_parallel: attention {name} now runs {type(processor).__name__}, which has no "
                             "sequence-parallel form; undo the patch, set the processor, and patch again")


def _sd3_forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                 block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict=True,
                 skip_layers=None):
    _check_processors(self)
    if block_controlnet_hidden_states is not None:
        group = self._mmfast_sp.group
        block_controlnet_hidden_states = [shard_sequence(r, group) for r in block_controlnet_hidden_states]
    return _inner_forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                          block_controlnet_hidden_states, joint_attention_kwargs, return_dict, skip_layers)


def _dit_forward(self, *args, **kwargs):
    _check_processors(self)
    return _inner_forward(self, *args, **kwargs)


def check_heads(name: str, heads: int, world: int) -> None:
    """Ulysses gives each rank heads / world of an attention's heads: refuse a world size
    that does not divide them, naming the attention."""
    if heads % world:
        raise ValueError(f"sequence_parallel: a world size of {world} does not divide the {heads} heads "
                         f"of attention {name}; Ulysses gives each rank heads / world_size of the heads")


def _ulysses_processors(model, handle: PatchHandle, state: SequenceParallelState) -> None:
    """Every attention of ``model`` gets the sequence-parallel form of its processor."""
    world = dist.get_world_size(state.group)
    for name, module in model.named_modules():
        if not hasattr(module, "set_processor"):
            continue
        processor = getattr(module, "processor", None)
        form = _SEQUENCE_PARALLEL_FORM.get(type(processor).__name__)
        if form is UlyssesAttnProcessor and (getattr(module, "is_cross_attention", False) or any(
                getattr(module, norm, None) is not None for norm in ("group_norm", "spatial_norm"))):
            form = None  # keys from elsewhere, or a norm over all tokens: not token-local
        if form is None:
            raise ValueError(f"sequence_parallel: attention {name} runs {type(processor).__name__}, which has "
                             "no sequence-parallel form (mmfast takes diffusers' JointAttnProcessor2_0 and "
                             "self-attention AttnProcessor2_0)")
        check_heads(name, module.heads, world)
        handle.set_attr(module, "processor", form(state))
        handle.replaced.append((name, f"{type(processor).__name__} -> Ulysses {form.__name__}"))


def _apply(model, handle: PatchHandle, shard_text: bool, out_projection: str, forward) -> None:
    """Names are relative to ``model``, as the family's table names them."""
    state = SequenceParallelState(handle.sequence_parallel)
    _ulysses_processors(model, handle, state)
    _wrap(model.pos_embed, handle, _shard_image_tokens, state, "pos_embed", "image tokens sharded")
    if shard_text:
        _wrap(model.context_embedder, handle, _shard_text_tokens, state, "context_embedder", "text tokens sharded")
    _wrap(getattr(model, out_projection), handle, _gather_image_tokens, state, out_projection,
          "image tokens gathered")
    _wrap(model, handle, forward, state, "", "sequence parallel (Ulysses)")
    handle.sequence_parallel_models.append(type(model).__name__)


def sd3_sequence_parallel(model, handle: PatchHandle) -> None:
    """SD3Transformer2DModel: image and text tokens sharded, joint attention on Ulysses."""
    _apply(model, handle, True, "proj_out", _sd3_forward)


def dit_sequence_parallel(model, handle: PatchHandle) -> None:
    """DiTTransformer2DModel: image tokens sharded, self-attention on Ulysses."""
    _apply(model, handle, False, "proj_out_2", _dit_forward)
