"""diffusers ``WanTransformer3DModel`` (Wan 2.1 / 2.2 video DiT): every ``WanAttention``
gets an mmfast processor (q/k RMSNorm across heads on ``rms_norm``, the 3D rotary on
``apply_rotary``, self- and cross-attention, and Wan 2.1 I2V's image-context branch, on
mmfast attention; see mmfast.nn.wan_transformer), each block's modulations and gated
residuals are fused (``adaln_modulate``, ``gated_residual``; the cross-attention norm on
``layer_norm``; Wan 2.2 TI2V's per-token modulation, ``timestep`` [B, T], too), and the
feed-forward's GELU(tanh) runs in one pass.

Left to diffusers: the patch embedding (a Conv3d), the rotary tables' construction, the
timestep / text / image embedders, the model's final norm and projection (inline in its
forward), and attention given a mask or
diffusers' context parallelism (``_parallel_config``): those calls run diffusers'
``WanAttnProcessor``. While patched, the attention backend is mmfast's dispatch (a
``set_attention_backend`` choice applies to those diffusers calls only).
``sequence_parallel=group``: video tokens split over the ranks, self-attention on
Ulysses (mmfast.integrations.diffusers.wan_sequence_parallel)."""

from __future__ import annotations

from mmfast.integrations.diffusers.replacements import patch_gelu
from mmfast.integrations.diffusers.wan_sequence_parallel import wan_sequence_parallel
from mmfast.integrations.patching import Family, Replacement
from mmfast.nn.wan_transformer import wan_attention_forward, wan_block_forward, wan_block_fusable


class FusedWanAttnProcessor:
    """diffusers ``WanAttnProcessor`` semantics on mmfast ops (see module doc)."""

    # What diffusers' set_attention_backend / enable_parallelism set on a processor.
    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attention_mask is not None or self._parallel_config is not None:
            from diffusers.models.transformers.transformer_wan import WanAttnProcessor

            processor = WanAttnProcessor()
            processor._attention_backend, processor._parallel_config = self._attention_backend, self._parallel_config
            return processor(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        return wan_attention_forward(attn, hidden_states, encoder_hidden_states, rotary_emb)


def patch_wan_attention(module, handle, name: str) -> None:
    """diffusers' own processor only: a custom one set by the user is left as it is."""
    previous = getattr(module, "processor", None)
    if type(previous).__name__ == "WanAttnProcessor" and type(previous).__module__.startswith("diffusers"):
        handle.set_attr(module, "processor", FusedWanAttnProcessor())
        handle.replaced.append((name, "WanAttnProcessor -> mmfast FusedWanAttnProcessor"))


def patch_wan_block(module, handle, name: str) -> None:
    if wan_block_fusable(module):
        handle.set_forward(module, wan_block_forward, "Wan block (fused modulation, gated residuals)", name)


FAMILY = Family(
    "diffusers-wan-transformer",
    model_classes=("WanTransformer3DModel",),
    replacements=(
        Replacement(("WanAttention",), patch_wan_attention, "attention processor"),
        Replacement(("WanTransformerBlock",), patch_wan_block, "Wan block"),
        Replacement(("GELU",), patch_gelu, "GELU"),
    ),
    sequence_parallel=wan_sequence_parallel,
)
