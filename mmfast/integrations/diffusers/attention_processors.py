"""diffusers attention processors that run ``mmfast.ops.attention``.

``AttnProcessor`` does what diffusers' ``AttnProcessor2_0`` does (self- or
cross-attention of an ``Attention`` module) and ``JointAttnProcessor`` what
``JointAttnProcessor2_0`` does (SD3's MM-DiT joint attention); the math is in
``mmfast.nn.diffusion_attention``. The FLUX processors (``FluxAttnProcessor``,
``Flux2AttnProcessor``, ``Flux2ParallelSelfAttnProcessor``: q/k RMSNorm, 3-axis rotary
inside the attention kernel) are in ``mmfast.nn.flux_attention``; given an
``attention_mask`` (FluxPipeline passes none) they run diffusers' own processor.

Masks. An ``attention_mask`` of the key-padding kind, [B, Tk] or [B, 1, Tk], boolean
(True = attend) or additive (0 = attend, <= -10000 = masked, as UNet2DConditionModel
makes from ``encoder_attention_mask``), runs the variable-length kernel over the kept
keys: two device->host syncs per call, so pass no mask when capturing a CUDA graph. Any
other mask (per query, soft biases, or a sample with no key kept, which SDPA averages
uniformly over all keys) goes to diffusers' own ``AttnProcessor2_0``, exactly as before.
"""

from __future__ import annotations

from mmfast.nn import flux_attention
from mmfast.nn.diffusion_attention import attention_forward, joint_attention_forward, key_padding


class AttnProcessor:
    """diffusers ``AttnProcessor2_0`` semantics on mmfast attention (see module doc)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        keep = None
        if attention_mask is not None:
            source = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
            keys = source.shape[1] if source.dim() == 3 else source.shape[2] * source.shape[3]
            keep = key_padding(attention_mask, hidden_states.shape[0], keys)
            if keep is None:
                from diffusers.models.attention_processor import AttnProcessor2_0

                return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask,
                                          temb, *args, **kwargs)
        return attention_forward(attn, hidden_states, encoder_hidden_states, keep, temb)


class JointAttnProcessor:
    """diffusers ``JointAttnProcessor2_0`` semantics (SD3 MM-DiT) on mmfast attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("attention_mask: JointAttnProcessor2_0 ignores it; so that nothing is "
                             "silently dropped, the mmfast processor refuses one")
        return joint_attention_forward(attn, hidden_states, encoder_hidden_states)


class _FluxProcessor:
    """Base of the FLUX processors: diffusers' class attributes (a processor with
    ``_parallel_config`` set, diffusers' context parallelism, is refused: mmfast would
    not split the sequence), and diffusers' own processor for a call with a mask."""

    _attention_backend = None
    _parallel_config = None
    _diffusers_class = ""  # the processor this one replaces, in diffusers.models.transformers
    _diffusers_module = ""

    def _original(self):
        import importlib

        module = importlib.import_module(f"diffusers.models.transformers.{self._diffusers_module}")
        return getattr(module, self._diffusers_class)()


class FluxAttnProcessor(_FluxProcessor):
    """diffusers ``FluxAttnProcessor`` (FLUX.1, Kontext, schnell) on mmfast ops."""

    _diffusers_class, _diffusers_module = "FluxAttnProcessor", "transformer_flux"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            flux_attention.check_no_parallel_config(self)
            return self._original()(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return flux_attention.flux_attention_forward(self, attn, hidden_states, encoder_hidden_states,
                                                     image_rotary_emb)


class Flux2AttnProcessor(_FluxProcessor):
    """diffusers ``Flux2AttnProcessor`` (FLUX.2 double-stream blocks) on mmfast ops."""

    _diffusers_class, _diffusers_module = "Flux2AttnProcessor", "transformer_flux2"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            flux_attention.check_no_parallel_config(self)
            return self._original()(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return flux_attention.flux2_attention_forward(self, attn, hidden_states, encoder_hidden_states,
                                                      image_rotary_emb)


class Flux2ParallelSelfAttnProcessor(_FluxProcessor):
    """diffusers ``Flux2ParallelSelfAttnProcessor`` (FLUX.2 single-stream blocks) on mmfast ops."""

    _diffusers_class, _diffusers_module = "Flux2ParallelSelfAttnProcessor", "transformer_flux2"

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            flux_attention.check_no_parallel_config(self)
            return self._original()(attn, hidden_states, attention_mask, image_rotary_emb)
        return flux_attention.flux2_parallel_attention_forward(self, attn, hidden_states, image_rotary_emb)


# diffusers processor class name -> the mmfast processor that takes its place.
REPLACES = {
    "AttnProcessor2_0": AttnProcessor,
    "JointAttnProcessor2_0": JointAttnProcessor,
    "FluxAttnProcessor": FluxAttnProcessor,
    "Flux2AttnProcessor": Flux2AttnProcessor,
    "Flux2ParallelSelfAttnProcessor": Flux2ParallelSelfAttnProcessor,
}


def patch_attention(module, handle, qualified_name: str) -> None:
    """Give one diffusers ``Attention`` module the mmfast processor matching its current
    one; processors without an mmfast counterpart (IP-adapter, LoRA, custom, KV-cache),
    or set up for diffusers' context parallelism, are left."""
    previous = getattr(module, "processor", None)
    replacement = REPLACES.get(type(previous).__name__)
    if (replacement is None or not type(previous).__module__.startswith("diffusers")
            or getattr(previous, "_parallel_config", None) is not None):
        return
    handle.set_attr(module, "processor", replacement())
    handle.replaced.append((qualified_name, f"{type(previous).__name__} -> mmfast {replacement.__name__}"))
