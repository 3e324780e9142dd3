"""SD3-family ``SD3Transformer2DModel`` (MM-DiT) assembled with mmfast blocks.

:func:`sd3_transformer_model` builds diffusers' transformer from its config (diffusers does
the wiring: patch embedding with its cropped position table, timestep + pooled-text
embedding, caption projection, unpatchify) and puts mmfast modules in place of its hot
parts:

- every ``JointTransformerBlock`` of the SD3 or SD3.5 kind (SD3.5: RMSNorm q/k norms,
  dual attention) -> :class:`mmfast.nn.MMDiTBlock` (joint attention and ``attn2`` on
  mmfast's attention, q/k norms on ``rms_norm``, adaLN modulations and gated residuals
  fused, GELU in one pass);
- the final ``AdaLayerNormContinuous`` -> mmfast's (one ``adaln_modulate`` pass).

Parameter names are unchanged, so a diffusers transformer's state_dict loads as it is.
Blocks of other kinds (other q/k norms, chunked feed-forward) stay diffusers' own. Needs
diffusers (imported on call).
"""

from __future__ import annotations

from torch import nn

from mmfast.nn import adaptive_norm, dit
from mmfast.nn._swap import swap_modules


def _same_parameters(ours: nn.Module, theirs: nn.Module) -> bool:
    """Whether two modules have the same state_dict names and shapes (so weights carry over)."""
    a, b = ours.state_dict(), theirs.state_dict()
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


_QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def _qk_norm_of(block) -> tuple[str | None, float] | None:
    """(qk_norm, eps) of a block's attentions as MMDiTBlock takes them: (None, 1e-6)
    without q/k norms, ("rms_norm", eps) when every one is a weighted RMSNorm without
    bias of one eps; None for any other kind (the block stays diffusers')."""
    norms = [getattr(a, n, None) for a in (block.attn, block.attn2) if a is not None for n in _QK_NORMS]
    norms = [n for n in norms if n is not None]
    if not norms:
        return None, 1e-6
    rms = all(type(n).__name__ == "RMSNorm" and getattr(n, "weight", None) is not None
              and getattr(n, "bias", None) is None for n in norms)
    eps = {n.eps for n in norms} if rms else set()
    return ("rms_norm", eps.pop()) if len(eps) == 1 else None


def _mmdit_block_from(block) -> nn.Module | None:
    attn, ff = block.attn, block.ff
    qk_norm = _qk_norm_of(block)
    if (not dit.mmdit_fusable(block) or getattr(block, "_chunk_size", None) is not None or qk_norm is None
            or type(ff.net[0]).__name__ != "GELU" or ff.net[0].approximate != "tanh"):
        return None
    new = dit.MMDiTBlock(dim=block.norm1.linear.in_features, num_attention_heads=attn.heads,
                         attention_head_dim=attn.inner_dim // attn.heads, context_pre_only=block.context_pre_only,
                         qk_norm=qk_norm[0], use_dual_attention=block.use_dual_attention, qk_norm_eps=qk_norm[1])
    return new if _same_parameters(new, block) else None


def _norm_out_from(norm) -> nn.Module | None:
    if not adaptive_norm.modulation_fusable(norm):
        return None
    linear = norm.linear
    new = adaptive_norm.AdaLayerNormContinuous(linear.out_features // 2, linear.in_features, eps=norm.norm.eps,
                                               bias=linear.bias is not None)
    return new if _same_parameters(new, norm) else None


def _replacement(module: nn.Module) -> nn.Module | None:
    name = type(module).__name__
    if name == "JointTransformerBlock":
        return _mmdit_block_from(module)
    if name == "AdaLayerNormContinuous":
        return _norm_out_from(module)
    return None


def use_mmfast_mmdit_blocks(model: nn.Module) -> list[str]:
    """Replace, in place, the SD3 transformer's blocks that mmfast has modules for, keeping
    their weights and names; returns the qualified names replaced."""
    return swap_modules(model, _replacement)


def sd3_transformer_model(config) -> nn.Module:
    """A diffusers ``SD3Transformer2DModel`` built from ``config`` (a dict or FrozenDict, as
    ``transformer.config``) with mmfast blocks in it; load a diffusers state_dict into it as is."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_config(config)
    use_mmfast_mmdit_blocks(model)
    return model


__all__ = ["sd3_transformer_model", "use_mmfast_mmdit_blocks"]
