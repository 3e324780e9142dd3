"""CLIP / SigLIP text towers on mmfast ops, with the module names of Hugging Face's
CLIPTextModel, CLIPTextModelWithProjection and SiglipTextModel (transformers 5 layout), so
that ``tower.load_state_dict(hf.state_dict())`` loads their weights as they are.

    embeddings        token embedding + learned position embedding
    encoder.layers    VisionBlock x depth: the vision towers' pre-LN blocks; CLIP's
                      attention is causal, SigLIP's bidirectional
    final_layer_norm  on every token -> last_hidden_state
    pooling           CLIP: the end-of-text token (see :func:`eos_positions`);
                      SigLIP: the last token, through ``head`` (a Linear)
    text_projection   CLIPTextModelWithProjection: pooled -> text_embeds (no bias)

Without an ``attention_mask`` attention runs on the padded layout [B, T, H, D]. With one,
the batch becomes a packed stream, each row's valid tokens first (:func:`pack_padding`),
and attention runs varlen with the boundaries of the valid tokens; no dense mask is made.
Valid tokens then see exactly the keys Hugging Face's mask lets them see. SigLIP's padding
tokens see the row's valid tokens, as in Hugging Face; that matters because SigLIP pools
the last token, padding or not. CLIP's padding tokens are the one difference: here they
see no key (attention output 0), where Hugging Face gives them the valid keys before them
(and its eager and sdpa backends disagree on left padding). CLIP pools at the end token,
a real one, so nothing downstream reads them.

Syncs: none. Building the packing is a few small device ops on the [B, T] mask.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mmfast.nn.norm import LayerNorm
from mmfast.nn.vision import Encoder, Packing, VisionAttention, VisionBlock, set_attention_dropout


class TextOutput(NamedTuple):
    """CLIPTextModel / SiglipTextModel's output. ``hidden_states`` (with
    ``output_hidden_states=True``): the embeddings, then each block's output, before
    ``final_layer_norm`` (depth + 1 tensors, as Hugging Face gives them)."""

    last_hidden_state: Tensor
    pooler_output: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class ProjectedTextOutput(NamedTuple):
    """CLIPTextModelWithProjection's output: ``out[0]`` is ``text_embeds``, as there."""

    text_embeds: Tensor
    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class PackedPadding(NamedTuple):
    """A padded [B, T] batch as one packed stream of B * T tokens: stream position i holds
    flat token ``order[i]`` (each row's valid tokens first, in order, then its padding);
    ``inverse`` undoes it; ``packing`` has the attention segments."""

    packing: Packing
    order: Tensor
    inverse: Tensor


def pack_padding(attention_mask: Tensor, causal: bool) -> PackedPadding:
    """The stream and attention segments for a padded batch (``attention_mask`` [B, T],
    nonzero = a real token). With L valid tokens in a row of T starting at s = b T:

    - causal: queries [s, s+L) see keys [s, s+L) causally (equal lengths, so the
      bottom-right alignment is the plain one); padding queries [s+L, s+T) get an empty
      key segment; the padding keys sit in a segment with no query;
    - bidirectional: all T queries of the row see its L valid keys; the padding keys sit
      in a segment with no query.

    Every size is fixed by the shapes (the stream keeps all B * T tokens), so nothing is
    read back to the host."""
    batch, tokens = attention_mask.shape
    device = attention_mask.device
    valid = attention_mask != 0
    lengths = valid.sum(-1, dtype=torch.int32)
    # A stable sort of "is padding" puts each row's valid tokens first, in their order.
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    order = (order + torch.arange(batch, device=device)[:, None] * tokens).flatten()
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    starts = torch.arange(batch, device=device, dtype=torch.int32) * tokens
    if causal:
        cu_q = torch.stack([starts, starts + lengths, starts + tokens], -1)
        cu_k = torch.stack([starts, starts + lengths, starts + lengths], -1)
    else:
        cu_q = torch.stack([starts, starts + tokens], -1)
        cu_k = torch.stack([starts, starts + lengths], -1)
    end = torch.full((1,), batch * tokens, dtype=torch.int32, device=device)
    cu_q, cu_k = torch.cat([cu_q.flatten(), end]), torch.cat([cu_k.flatten(), end])
    return PackedPadding(Packing(cu_q, tokens, cu_k), order, inverse)


def eos_positions(input_ids: Tensor, eos_token_id: int | None) -> Tensor:
    """Where CLIP pools each row, as transformers does: the first ``eos_token_id``; or, for
    configs whose ``eos_token_id`` is 2 (written before transformers PR #24773, when that
    was wrong), the highest token id, which is CLIP's end-of-text token."""
    ids = input_ids.to(torch.int)
    if eos_token_id == 2:
        return ids.argmax(-1)
    return (ids == eos_token_id).int().argmax(-1)


class TextEmbeddings(nn.Module):
    """``token_embedding(input_ids) + position_embedding(position_ids)`` (positions 0..T-1
    unless given)."""

    def __init__(self, vocab_size: int, max_position_embeddings: int, hidden_size: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.token_embedding = nn.Embedding(vocab_size, hidden_size, **factory)
        self.position_embedding = nn.Embedding(max_position_embeddings, hidden_size, **factory)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class TextTransformer(nn.Module):
    """A CLIP (``style="clip"``: causal attention, pooled at the end-of-text token) or
    SigLIP (``style="siglip"``: bidirectional attention, the last token through ``head``)
    text tower; see the module docstring.

    ``forward(input_ids, attention_mask=None, position_ids=None, output_hidden_states=False)``
    returns :class:`TextOutput` as the Hugging Face model does. :meth:`from_config` builds
    one from a CLIPTextConfig / SiglipTextConfig and keeps it as ``config``.
    """

    def __init__(self, *, style: str, vocab_size: int, max_position_embeddings: int, hidden_size: int,
                 num_layers: int, num_heads: int, intermediate_size: int, hidden_act: str = "quick_gelu",
                 layer_norm_eps: float = 1e-5, eos_token_id: int | None = None, projection_size: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        if style not in ("clip", "siglip"):
            raise ValueError(f"style: expected 'clip' or 'siglip', got {style!r}")
        if style == "clip" and not isinstance(eos_token_id, int):
            raise ValueError(f"eos_token_id: a CLIP text tower pools at its end token; expected an int, "
                             f"got {eos_token_id!r}")
        factory = {"device": device, "dtype": dtype}
        self.style, self.causal, self.eos_token_id = style, style == "clip", eos_token_id
        self.config = None
        self.embeddings = TextEmbeddings(vocab_size, max_position_embeddings, hidden_size, **factory)
        attention = partial(VisionAttention, causal=self.causal)
        self.encoder = Encoder([
            VisionBlock(hidden_size, num_heads, intermediate_size, hidden_act, layer_norm_eps, attention=attention,
                        **factory)
            for _ in range(num_layers)
        ])
        self.final_layer_norm = LayerNorm(hidden_size, eps=layer_norm_eps, **factory)
        if style == "siglip":
            self.head = nn.Linear(hidden_size, projection_size or hidden_size, **factory)

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> "TextTransformer":
        """From a Hugging Face CLIPTextConfig or SiglipTextConfig."""
        styles = {"clip_text_model": "clip", "siglip_text_model": "siglip"}
        model_type = getattr(config, "model_type", None)
        if model_type not in styles:
            raise ValueError(f"config: expected a CLIP or SigLIP text config "
                             f"(model_type {', '.join(styles)}), got {model_type!r}")
        tower = cls(style=styles[model_type], vocab_size=config.vocab_size,
                    max_position_embeddings=config.max_position_embeddings, hidden_size=config.hidden_size,
                    num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                    intermediate_size=config.intermediate_size, hidden_act=config.hidden_act,
                    layer_norm_eps=config.layer_norm_eps, eos_token_id=config.eos_token_id,
                    projection_size=getattr(config, "projection_size", None), device=device, dtype=dtype)
        set_attention_dropout(tower, getattr(config, "attention_dropout", 0.0))
        tower.config = config
        return tower

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.token_embedding.weight.device

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                output_hidden_states: bool = False) -> TextOutput:
        ids = self._check_ids(input_ids)
        batch, tokens = ids.shape
        hidden = self.embeddings(ids, position_ids)
        padding = None
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, got "
                                 f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
            padding = pack_padding(attention_mask.reshape(batch, tokens).to(ids.device), self.causal)
            hidden = hidden.flatten(0, 1).index_select(0, padding.order)

        def restore(x: Tensor) -> Tensor:  # back to [B, T, E] in the tokens' own order
            return x if padding is None else x.index_select(0, padding.inverse).view(batch, tokens, -1)

        states = [] if output_hidden_states else None
        delta = None
        for layer in self.encoder.layers:
            if states is not None:
                states.append(restore(hidden if delta is None else hidden + delta))
            hidden, delta = layer.forward_residual(hidden, delta, None if padding is None else padding.packing)
        if delta is None:  # no layers
            last = self.final_layer_norm(hidden)
        else:  # the last residual add fused into the final norm
            last, hidden = self.final_layer_norm(delta, residual=hidden)
        if states is not None:
            states.append(restore(hidden))
        last = restore(last)
        rows = torch.arange(batch, device=last.device)
        if self.style == "clip":
            pooled = last[rows, eos_positions(ids, self.eos_token_id).to(last.device)]
        else:
            pooled = self.head(last[:, -1])
        return TextOutput(last, pooled, None if states is None else tuple(states))

    def _check_ids(self, input_ids) -> Tensor:
        if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or input_ids.is_complex() \
                or input_ids.dim() < 1:
            raise TypeError(f"input_ids: expected an integer tensor [..., tokens], got "
                            f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        limit = self.embeddings.position_embedding.num_embeddings
        if input_ids.shape[-1] > limit:
            raise ValueError(f"input_ids: {input_ids.shape[-1]} tokens, more than the "
                             f"{limit} positions of the position embedding")
        return input_ids.reshape(-1, input_ids.shape[-1])

    @staticmethod
    def adapt_checkpoint(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Keys of checkpoints written by transformers 4 (Stable Diffusion's text_encoder/
        among them) as this module names them: without the ``text_model.`` prefix that
        CLIPTextModel had then, and without the ``position_ids`` buffer once saved."""
        return _adapt_keys(state, strip_prefix=True)


class TextTransformerWithProjection(nn.Module):
    """CLIPTextModelWithProjection: a CLIP :class:`TextTransformer` (``text_model``) and
    ``text_projection`` (no bias); ``forward`` returns :class:`ProjectedTextOutput`."""

    def __init__(self, text_model: TextTransformer, projection_dim: int):
        super().__init__()
        if text_model.style != "clip":
            raise ValueError(f"text_model: expected a CLIP text tower, got style {text_model.style!r}")
        weight = text_model.final_layer_norm.weight
        self.text_model = text_model
        self.text_projection = nn.Linear(weight.shape[0], projection_dim, bias=False, device=weight.device,
                                         dtype=weight.dtype)
        self.config = text_model.config

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> "TextTransformerWithProjection":
        """From a Hugging Face CLIPTextConfig (``projection_dim`` wide)."""
        return cls(TextTransformer.from_config(config, device=device, dtype=dtype), config.projection_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.device

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                output_hidden_states: bool = False) -> ProjectedTextOutput:
        out = self.text_model(input_ids, attention_mask, position_ids, output_hidden_states)
        return ProjectedTextOutput(self.text_projection(out.pooler_output), out.last_hidden_state, out.hidden_states)

    @staticmethod
    def adapt_checkpoint(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Without the ``position_ids`` buffer that transformers 4 checkpoints may hold."""
        return _adapt_keys(state, strip_prefix=False)


def _adapt_keys(state: dict[str, Tensor], strip_prefix: bool) -> dict[str, Tensor]:
    state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    if strip_prefix and state and all(k.startswith("text_model.") for k in state):
        state = {k[len("text_model."):]: v for k, v in state.items()}
    return state


__all__ = ["PackedPadding", "ProjectedTextOutput", "TextEmbeddings", "TextOutput", "TextTransformer",
           "TextTransformerWithProjection", "eos_positions", "pack_padding"]
