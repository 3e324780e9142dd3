"""BLIP-2: a ViT, a Q-Former over learned query tokens, a linear projection and a
decoder-only language model (OPT as released; Qwen2 or Llama also load), all on mmfast
modules, loading Hugging Face's ``Blip2ForConditionalGeneration`` weights.

Inputs as transformers 5 takes them: each image becomes ``num_query_tokens`` Q-Former
outputs, projected to the language model's width, which replace the
``image_token_index`` placeholder embeddings of ``input_ids`` image after image in reading
order (the processor writes ``num_query_tokens`` placeholders per image before the
text). transformers 5 no longer prepends the queries, so a config without
``image_token_index`` is refused when images are given, rather than the images being
silently ignored.

Prompts run unpadded, packed into one token stream, each with positions 0 .. n - 1:
what Hugging Face's OPT derives from the attention mask, so padded batches match it in
``forward`` and ``generate`` alike (Qwen2 / Llama number padding in ``forward``; see
:mod:`mmfast.models.llava`). As in Hugging Face, ``from_pretrained`` keeps the Q-Former and
the query tokens in float32 whatever the dtype of the rest.

Module names equal transformers' (``vision_model.*``, ``query_tokens``, ``qformer.*``,
``language_projection``, ``language_model.model.decoder.*`` for OPT or
``language_model.model.*`` for Qwen2 / Llama, ``language_model.lm_head``), which is also
what its ``save_pretrained`` writes and the released Salesforce checkpoints hold.

Encoder-decoder language models (the Flan-T5 BLIP-2 checkpoints) are not supported.

Training mode applies the configs' dropouts as Hugging Face does: hidden-state dropout,
the Q-Former's attention-probability dropout (``attention_probs_dropout_prob``, 0.1 by
default) and OPT's ``attention_dropout``, the latter two inside mmfast's attention kernels
(forward and backward; masks drawn from torch's default generator, so not Hugging Face's
masks). Eval mode drops nothing.

Host syncs: one per ``forward`` / ``generate`` call (prompt lengths, placeholder count),
one per generated token (the end-of-sequence test).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional, Union

import torch
from torch import Tensor, nn

from mmfast.models.checkpoint import (config_dtype, load_pretrained, read_config, register_architecture,
                                     save_pretrained)
from mmfast.models.decode_graph import DecodeGraphs
from mmfast.models.generation import Decoding, decode
from mmfast.models.llava import _text_kwargs
from mmfast.models.lm_loss import CausalLMOutput, causal_lm_loss
from mmfast.models.opt_decoder import OPTDecoder
from mmfast.models.packing import pack_prompts
from mmfast.models.qwen2_decoder import Qwen2Decoder
from mmfast.nn.blip_vision import BlipVisionTransformer
from mmfast.nn.qformer import QFormer

# transformers' defaults for fields a config.json may leave out (the released BLIP-2
# configs list only what differs from them).
VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
QFORMER_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1, max_position_embeddings=512, layer_norm_eps=1e-12,
                        cross_attention_frequency=2, use_qformer_text_input=False)
OPT_DEFAULTS = dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                    max_position_embeddings=2048, do_layer_norm_before=True, _remove_final_layer_norm=False,
                    word_embed_proj_dim=None, dropout=0.1, attention_dropout=0.0, activation_function="relu",
                    enable_bias=True, layer_norm_elementwise_affine=True, pad_token_id=1, bos_token_id=2,
                    eos_token_id=2, tie_word_embeddings=True)
DECODER_ONLY_TYPES = ("opt", "qwen2", "llama")
OPT_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu")

PRESETS = {
    "tiny": dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        text_config=dict(model_type="opt", vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128),
        num_query_tokens=4, image_token_index=250),
    # Salesforce/blip2-opt-2.7b's published config.json (the rest are the defaults above).
    "opt-2.7b": dict(
        vision_config={}, qformer_config={},
        text_config=dict(model_type="opt", vocab_size=50304, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                         num_attention_heads=32, word_embed_proj_dim=2560, eos_token_id=50118),
        num_query_tokens=32, image_token_index=50265),
}


def _text_config(config: dict) -> dict:
    """The text_config dict with transformers' defaults filled in (OPT when no model_type)."""
    text = dict(config.get("text_config") or {})
    model_type = text.setdefault("model_type", "opt")
    if model_type not in DECODER_ONLY_TYPES:
        kind = ("an encoder-decoder language model (the Flan-T5 BLIP-2 checkpoints), which mmfast does not support"
                if text.get("is_encoder_decoder") or "t5" in model_type else "not supported")
        raise ValueError(f"config.json: text_config model_type {model_type!r} is {kind}; mmfast's BLIP-2 takes "
                         f"a decoder-only language model: {', '.join(DECODER_ONLY_TYPES)}")
    if model_type == "opt":
        text = {**OPT_DEFAULTS, **text}
        text["word_embed_proj_dim"] = text["word_embed_proj_dim"] or text["hidden_size"]
        if text["activation_function"] not in OPT_ACTIVATIONS:
            raise ValueError(f"config.json: text_config activation_function {text['activation_function']!r} "
                             f"(supported: {', '.join(OPT_ACTIVATIONS)})")
    return text


@dataclass
class Blip2Config:
    """What the model reads from a Hugging Face ``Blip2Config`` (config.json dict): the
    three sub-configs in Hugging Face's format, defaults filled in."""
    vision_config: dict
    qformer_config: dict
    text_config: dict
    num_query_tokens: int = 32
    image_token_index: Optional[int] = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> "Blip2Config":
        vision = {**VISION_DEFAULTS, **(config.get("vision_config") or {}), "model_type": "blip_2_vision_model"}
        qformer = {**QFORMER_DEFAULTS, **(config.get("qformer_config") or {}), "model_type": "blip_2_qformer",
                   "encoder_hidden_size": vision["hidden_size"]}  # as Blip2Config.__post_init__ sets it
        text = _text_config(config)
        made = cls(vision, qformer, text, int(config.get("num_query_tokens", 32)),
                   config.get("image_token_index", config.get("image_token_id")), raw=dict(config))
        if made.text_type == "opt" and text["word_embed_proj_dim"] != text["hidden_size"]:
            raise ValueError(f"config.json: text_config word_embed_proj_dim {text['word_embed_proj_dim']} != "
                             f"hidden_size {text['hidden_size']}: the language projection writes hidden_size-wide "
                             "features into the word embeddings, so the two must agree (as in Hugging Face)")
        return made

    @classmethod
    def preset(cls, name: str) -> "Blip2Config":
        """'tiny' (a CPU runs it in well under a second) or 'opt-2.7b' (the released size)."""
        if name not in PRESETS:
            raise ValueError(f"name: unknown BLIP-2 preset {name!r} (known: {', '.join(PRESETS)})")
        return cls.from_dict({**PRESETS[name], "architectures": ["Blip2ForConditionalGeneration"], "preset": name})

    @property
    def text_type(self) -> str:
        return self.text_config["model_type"]

    @property
    def text_hidden_size(self) -> int:
        return self.text_config["hidden_size"]

    @property
    def tie_word_embeddings(self) -> bool:
        default = self.text_type == "opt"  # OPTConfig ties by default, Qwen2Config / LlamaConfig do not
        return bool(self.text_config.get("tie_word_embeddings", default))

    def vision_kwargs(self) -> dict:
        v = self.vision_config
        return dict(hidden_size=v["hidden_size"], num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                    intermediate_size=v["intermediate_size"], image_size=v["image_size"], patch_size=v["patch_size"],
                    hidden_act=v["hidden_act"], layer_norm_eps=v["layer_norm_eps"], qkv_bias=v["qkv_bias"])

    def decoder(self) -> nn.Module:
        t = self.text_config
        if self.text_type != "opt":
            return Qwen2Decoder(**_text_kwargs(t))
        return OPTDecoder(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], ffn_dim=t["ffn_dim"],
                          num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
                          max_position_embeddings=t["max_position_embeddings"],
                          word_embed_proj_dim=t["word_embed_proj_dim"], do_layer_norm_before=t["do_layer_norm_before"],
                          remove_final_layer_norm=t["_remove_final_layer_norm"], enable_bias=t["enable_bias"],
                          layer_norm_elementwise_affine=t["layer_norm_elementwise_affine"],
                          activation_function=t["activation_function"], dropout=t["dropout"],
                          attention_dropout=t["attention_dropout"], pad_token_id=t["pad_token_id"])

    def to_dict(self) -> dict:
        """A transformers-5 style config.json dict (over the one it was read from, if any)."""
        raw = {k: v for k, v in self.raw.items() if k not in ("preset", "dtype", "torch_dtype")}
        return {**raw, "architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2",
                "vision_config": dict(self.vision_config), "qformer_config": dict(self.qformer_config),
                "text_config": dict(self.text_config), "num_query_tokens": self.num_query_tokens,
                "image_token_index": self.image_token_index, "use_decoder_only_language_model": True}


class _OPTModel(nn.Module):
    """transformers' ``OPTModel`` names: the decoder under ``decoder``."""

    def __init__(self, decoder: OPTDecoder):
        super().__init__()
        self.decoder = decoder


class _CausalLM(nn.Module):
    """transformers' ``*ForCausalLM`` names: ``model`` (OPT: ``model.decoder``) and ``lm_head``."""

    def __init__(self, config: Blip2Config):
        super().__init__()
        decoder = config.decoder()
        self.model = _OPTModel(decoder) if isinstance(decoder, OPTDecoder) else decoder
        width = decoder.word_embed_proj_dim if isinstance(decoder, OPTDecoder) else decoder.hidden_size
        self.lm_head = nn.Linear(width, config.text_config["vocab_size"], bias=False)

    @property
    def decoder(self) -> Union[OPTDecoder, Qwen2Decoder]:
        return getattr(self.model, "decoder", self.model)


@dataclass
class _Prompt:
    """A batch of prompts packed into one token stream."""
    embeds: Tensor      # [T, C]
    positions: Tensor   # [T]: each token's index in its sequence
    cu_seqlens: Tensor  # int32 [B+1]
    lengths: list       # host ints
    mask: Tensor        # bool [B, Tpad]: which padded positions hold tokens


@register_architecture("Blip2ForConditionalGeneration")
class Blip2ForConditionalGeneration(nn.Module):
    """BLIP-2 on mmfast kernels; state dict names equal transformers'
    ``Blip2ForConditionalGeneration`` (see the module docstring)."""

    def __init__(self, config: Union[Blip2Config, dict]):
        super().__init__()
        self.config = config if isinstance(config, Blip2Config) else Blip2Config.from_dict(config)
        c = self.config
        self.vision_model = BlipVisionTransformer(**c.vision_kwargs())
        self.query_tokens = nn.Parameter(torch.zeros(1, c.num_query_tokens, c.qformer_config["hidden_size"]))
        self.qformer = QFormer(SimpleNamespace(**c.qformer_config))
        self.language_projection = nn.Linear(c.qformer_config["hidden_size"], c.text_hidden_size)
        self.language_model = _CausalLM(c)
        self.tie_weights()
        self._decode_graphs = DecodeGraphs()  # generate(cuda_graph=True)'s captured step

    # ---- checkpoints ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None) -> "Blip2ForConditionalGeneration":
        """Load a transformers-format directory (config.json + safetensors). ``dtype``:
        the parameters' dtype (default: the config's ``dtype``/``torch_dtype``, else
        float32), except the Q-Former and query tokens, kept in float32 as Hugging Face does."""
        def keep_qformer_in_float32(model):
            model.qformer.float()
            model.query_tokens = nn.Parameter(model.query_tokens.float())

        raw = read_config(directory)
        dtype = config_dtype(raw) if dtype is None else dtype
        # No renaming rules: transformers 4 and 5 both write the module's names.
        return load_pretrained(cls, directory, raw, dtype, device, prepare=keep_qformer_in_float32)

    @classmethod
    def from_preset(cls, name: str) -> "Blip2ForConditionalGeneration":
        """A randomly initialised model of a named size ('tiny', 'opt-2.7b'). Build large
        ones under ``torch.device(...)`` and cast after, or under ``torch.device("meta")``
        to inspect shapes only."""
        return cls(Blip2Config.preset(name))

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.language_model.lm_head.weight = self.language_model.decoder.embed_tokens.weight

    def save_pretrained(self, directory: Union[str, os.PathLike], **kwargs):
        """Write config.json and safetensors that transformers and :meth:`from_pretrained` load."""
        dtype = str(self.language_projection.weight.dtype).removeprefix("torch.")
        return save_pretrained(self, directory, {**self.config.to_dict(), "dtype": dtype}, **kwargs)

    # ---- inputs -> packed stream ---------------------------------------------------

    def image_features(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """Projected query outputs [images, num_query_tokens, text hidden] of
        ``pixel_values`` [images, 3, H, W]."""
        image_embeds = self.vision_model(pixel_values, interpolate_pos_encoding).last_hidden_state
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        # Every image token is valid: no encoder mask (Hugging Face passes all ones).
        query_output = self.qformer(queries, image_embeds)
        return self.language_projection(query_output.to(self.language_projection.weight.dtype))

    def _prompt(self, input_ids: Tensor, attention_mask: Optional[Tensor], pixel_values: Optional[Tensor],
                interpolate_pos_encoding: bool) -> _Prompt:
        packed = pack_prompts(input_ids, attention_mask)
        ids = packed.ids
        embeds = self.language_model.decoder.embed_tokens(ids)
        image_token = self.config.image_token_index
        count = 0 if image_token is None else int((ids == image_token).sum())
        if pixel_values is None:
            if count:
                raise ValueError(f"input_ids: {count} image tokens (id {image_token}) but no pixel_values were given")
        else:
            if image_token is None:
                raise ValueError("pixel_values: the config has no image_token_index, so input_ids cannot say where "
                                 "the images go (transformers 5 no longer prepends them); add image_token_index to "
                                 "config.json and num_query_tokens of those tokens per image to the prompts")
            if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4:
                raise ValueError(f"pixel_values: expected [images, C, H, W], got "
                                 f"{getattr(pixel_values, 'shape', type(pixel_values))}")
            queries = self.config.num_query_tokens
            if count != pixel_values.shape[0] * queries:
                raise ValueError(f"input_ids: {count} image tokens (id {image_token}), but pixel_values gives "
                                 f"{pixel_values.shape[0]} images x {queries} query tokens")
            features = self.image_features(pixel_values, interpolate_pos_encoding)
            embeds = embeds.masked_scatter((ids == image_token)[:, None], features.to(embeds.dtype))
        return _Prompt(embeds, packed.positions(), packed.cu_seqlens, packed.lengths, packed.mask)

    def _check_length(self, length: int, what: str) -> None:
        decoder = self.language_model.decoder
        limit = getattr(decoder, "max_position_embeddings", None)  # OPT's learned table; RoPE has none
        if limit is not None and length > limit:
            raise ValueError(f"{what}: {length} tokens exceed the language model's max_position_embeddings {limit}")

    def _run_decoder(self, embeds: Tensor, positions: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                     cache=None, new_lengths=None) -> Tensor:
        decoder = self.language_model.decoder
        if isinstance(decoder, Qwen2Decoder):
            positions = positions.expand(3, -1)  # equal t/h/w streams: plain 1D RoPE
        return decoder(embeds, positions, cu_seqlens, max_seqlen, cache=cache, new_lengths=new_lengths)

    # ---- forward / generate --------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                pixel_values: Optional[Tensor] = None, interpolate_pos_encoding: bool = False,
                labels: Optional[Tensor] = None,
                num_items_in_batch: Union[Tensor, int, None] = None) -> Union[Tensor, CausalLMOutput]:
        """Logits [B, T, vocab] (padded positions hold 0); with ``labels`` [B, T], a
        :class:`~mmfast.models.lm_loss.CausalLMOutput` holding transformers' causal-LM loss
        (shifted inside; -100 and padding ignored), computed by the fused linear
        cross-entropy without forming the logits."""
        prompt = self._prompt(input_ids, attention_mask, pixel_values, interpolate_pos_encoding)
        self._check_length(max(prompt.lengths), "input_ids")
        hidden = self._run_decoder(prompt.embeds, prompt.positions, prompt.cu_seqlens, max(prompt.lengths))
        if labels is not None:
            return CausalLMOutput(causal_lm_loss(hidden, self.language_model.lm_head, labels, prompt.mask,
                                                 num_items_in_batch))
        logits = self.language_model.lm_head(hidden)
        if min(prompt.lengths) == input_ids.shape[1]:  # no padding: the packed stream is the batch
            return logits.view(*input_ids.shape, -1)
        out = logits.new_zeros(*input_ids.shape, logits.shape[-1])
        out[prompt.mask] = logits
        return out

    @torch.no_grad()
    def generate(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, *,
                 pixel_values: Optional[Tensor] = None, interpolate_pos_encoding: bool = False,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, eos_token_id: Optional[Union[int, list]] = None,
                 pad_token_id: Optional[int] = None, cuda_graph: bool = False) -> Tensor:
        """Greedy (or, with ``do_sample``, sampled: ``temperature``, ``top_k``, ``top_p``,
        ``generator``) continuation of a batch of prompts with a KV cache. Returns
        ``[B, T + n]``: the prompts, then the new tokens; a finished sequence (it produced
        ``eos_token_id``) continues with ``pad_token_id``, and the loop stops when all have
        finished. Without ``input_ids``, each image is captioned from its placeholders and
        the BOS token, as transformers does. ``cuda_graph``: replay the one-token step as a
        CUDA graph (:mod:`mmfast.models.decode_graph`; CUDA only; same greedy ids)."""
        if cuda_graph:
            self._decode_graphs.check_device(self.language_model.lm_head.weight.device)
        text = self.config.text_config
        settings = Decoding.resolve(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator, eos_token_id=text.get("eos_token_id") if eos_token_id is None else eos_token_id,
            pad_token_id=text.get("pad_token_id") if pad_token_id is None else pad_token_id)
        if input_ids is None:
            if pixel_values is None:
                raise ValueError("input_ids, pixel_values: give at least one")
            if text.get("bos_token_id") is None or self.config.image_token_index is None:
                raise ValueError("input_ids: required when the config has no bos_token_id or image_token_index")
            start = [self.config.image_token_index] * self.config.num_query_tokens + [text["bos_token_id"]]
            input_ids = torch.tensor([start], device=pixel_values.device).repeat(pixel_values.shape[0], 1)
        prompt = self._prompt(input_ids, attention_mask, pixel_values, interpolate_pos_encoding)
        self._check_length(max(prompt.lengths) + max_new_tokens, "input_ids + max_new_tokens")
        decoder, batch = self.language_model.decoder, input_ids.shape[0]
        capacity = max(prompt.lengths) + max_new_tokens
        cache = self._decode_graphs.kv_cache(decoder, batch, capacity, max_new_tokens) if cuda_graph \
            else decoder.new_cache(batch, capacity)
        hidden = self._run_decoder(prompt.embeds, prompt.positions, prompt.cu_seqlens, max(prompt.lengths),
                                   cache=cache, new_lengths=prompt.lengths)
        position = torch.tensor(prompt.lengths, device=input_ids.device)
        one_each = torch.arange(batch + 1, dtype=torch.int32, device=input_ids.device)

        def step(token: Tensor, position: Tensor) -> Tensor:
            return self._run_decoder(decoder.embed_tokens(token), position, one_each, 1, cache=cache,
                                     new_lengths=[1] * batch)

        run = self._decode_graphs.decode if cuda_graph else decode
        new_tokens = run(hidden[prompt.cu_seqlens[1:].long() - 1], self.language_model.lm_head, step, settings,
                         position, cache)
        return torch.cat([input_ids, new_tokens.to(input_ids.dtype)], dim=1)
