"""SAM (transformers SamModel, SamVisionModel, SamVisionEncoder; SAM-HQ's SamHQ* classes,
whose image encoder is the same code): the image encoder's
attention, windowed (14 x 14) and global alike, runs mmfast.ops.attention_rel_pos: the
decomposed relative-position bias enters the attention kernel as its two pieces (rel_h,
rel_w: q times the tables of SamVisionAttention.get_rel_pos), where Hugging Face adds a
materialised [B * heads, T, T] bias (4096 x 4096 per head in the global layers at 1024 px).
The pieces are computed by torch from q, so the tables and q get their gradients through
autograd; q, k, v are views of the qkv projection (no copies). The prompt encoder and mask
decoder are untouched.

Falls back to the original forward for what the fused op does not do: attention weights
asked for (``output_attentions``, the config, or an enclosing forward collecting them),
and attention dropout while training on the eager class (the sdpa class ignores
``attention_dropout``, and so does the patched one).

An image whose size is not the config's image_size raises a ValueError naming
``pixel_values`` before the patch embedding (Hugging Face raises one without the name).
"""

from __future__ import annotations

from mmfast.integrations.patching import Family, Replacement
from mmfast.integrations.transformers._outputs import asked
from mmfast.ops.attention import attention
from mmfast.ops.attention_rel_pos import attention_rel_pos, decomposed_rel_pos


EAGER_CLASSES = ("SamVisionAttention", "SamHQVisionAttention")


def _falls_back(module, output_attentions) -> bool:
    if asked(module, {"output_attentions": output_attentions}, "attentions"):
        return True
    # Only the eager class applies attention dropout (SamVisionSdpaAttention does not).
    return module.training and module.dropout > 0 and type(module).__name__ in EAGER_CLASSES


def _attention_forward(self, hidden_states, output_attentions=None):
    if _falls_back(self, output_attentions):
        return type(self).forward(self, hidden_states, output_attentions=output_attentions)
    batch, height, width, _ = hidden_states.shape
    tokens = height * width
    q, k, v = self.qkv(hidden_states).view(batch, tokens, 3, self.num_attention_heads, -1).unbind(2)
    if self.use_rel_pos:
        table_h = self.get_rel_pos(height, height, self.rel_pos_h)
        table_w = self.get_rel_pos(width, width, self.rel_pos_w)
        rel_h, rel_w = decomposed_rel_pos(q, table_h, table_w, (height, width))
        out = attention_rel_pos(q, k, v, rel_h, rel_w, scale=self.scale)
    else:
        out = attention(q, k, v, scale=self.scale)
    return self.proj(out.reshape(batch, height, width, -1)), None


def _patch_attention(module, handle, name):
    handle.set_forward(module, _attention_forward, "attention with the decomposed relative-position bias fused",
                       name)


def _patch_embeddings_forward(self, pixel_values):
    expected = (self.num_channels, *self.image_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values: expected [batch, {expected[0]}, {expected[1]}, {expected[2]}] (the config's "
            f"num_channels and image_size; SAM's processor resizes and pads images to it), "
            f"got shape {tuple(pixel_values.shape)}"
        )
    return type(self).forward(self, pixel_values)


def _patch_embeddings(module, handle, name):
    handle.set_forward(module, _patch_embeddings_forward, "image size checked, naming pixel_values", name)


FAMILY = Family(
    "sam",
    model_classes=("SamModel", "SamVisionModel", "SamVisionEncoder", "SamHQModel", "SamHQVisionModel",
                   "SamHQVisionEncoder"),
    replacements=(
        Replacement(("SamVisionAttention", "SamVisionSdpaAttention", "SamHQVisionAttention",
                     "SamHQVisionSdpaAttention"), _patch_attention,
                    "attention with the decomposed relative-position bias fused"),
        Replacement(("SamPatchEmbeddings", "SamHQPatchEmbeddings"), _patch_embeddings,
                    "image size checked, naming pixel_values"),
    ),
    notes="image encoder attention; prompt encoder and mask decoder untouched",
)
