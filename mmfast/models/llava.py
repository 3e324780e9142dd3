"""LLaVA: a CLIP / SigLIP vision tower, an MLP projector and a Llama (or Qwen2) decoder,
all on mmfast modules, loading Hugging Face's ``LlavaForConditionalGeneration`` weights.

The tower's hidden states after layer ``vision_feature_layer`` (an index into Hugging
Face's ``hidden_states``: 0 is the embedding output, -1 the last layer, before the final
norm; a list concatenates several), with the CLS token dropped under the "default"
``vision_feature_select_strategy`` ("full" keeps it), go through the projector and
replace the ``image_token_index`` placeholder embeddings, image after image in reading
order. The tower stops at the deepest layer it needs (LLaVA-1.5 skips the last one).

The decoder is :class:`~mmfast.models.qwen2_decoder.Qwen2Decoder`: Llama is the same
block without the q/k/v biases, and plain 1D RoPE is M-RoPE with one position stream.
Prompts run unpadded, packed into one token stream, each with positions 0 .. n - 1 (what
transformers' ``generate`` uses for left-padded batches; its ``forward`` without
``position_ids`` numbers padding too, so padded logits agree only given those ids).

Module names equal transformers 5's in memory (``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head``); checkpoints
are read in the layout its ``save_pretrained`` writes and the released llava-hf models
use (``vision_tower.[vision_model.]*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head``) or under the in-memory names;
``save_pretrained`` writes that layout and a transformers-5 config.json, so transformers
and :meth:`LlavaForConditionalGeneration.from_pretrained` both load what it writes.

Host syncs: one per ``forward`` / ``generate`` call (prompt lengths, placeholder count),
one per generated token (the end-of-sequence test).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor, nn

from mmfast.models.checkpoint import (config_dtype, load_pretrained, read_config, register_architecture,
                                     save_pretrained)
from mmfast.models.decode_graph import DecodeGraphs
from mmfast.models.generation import Decoding, decode
from mmfast.models.lm_loss import CausalLMOutput, causal_lm_loss
from mmfast.models.packing import pack_prompts
from mmfast.models.qwen2_decoder import Qwen2Decoder
from mmfast.nn.projector import MLPProjector
from mmfast.nn.vision import VisionTransformer

# What save_pretrained writes (transformers 5) or the released llava-hf checkpoints hold
# -> the module's names (transformers 5's in memory).
CHECKPOINT_RULES = (
    (r"^(model\.)?vision_tower\.(vision_model\.)?", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.(model\.)?", "model.language_model."),
)
# The module's names -> what transformers 5's save_pretrained writes (the rules' inverse).
SAVED_PREFIXES = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)

# Hugging Face's defaults for fields a config.json may leave out.
_VISION_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6, vision_use_head=True),
}
_TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6),
}

# Named configurations (config.json dicts) for random-weight models: "tiny" runs on a CPU
# in well under a second; "llava-1.5-7b" is llava-hf/llava-1.5-7b-hf's published config
# (CLIP ViT-L/14 at 336 px, Vicuna-7B = Llama-2-7B sizes; the rest are the defaults above).
PRESETS = {
    "tiny": dict(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=14),
        text_config=dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=250),
    "llava-1.5-7b": dict(
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768),
        text_config=dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2),
        image_token_index=32000, pad_token_id=32001, vocab_size=32064),
}


def _vision_kwargs(config: dict) -> dict:
    """VisionTransformer keyword arguments from a CLIP / SigLIP vision config dict."""
    model_type = config.get("model_type", "clip_vision_model")
    if model_type not in _VISION_DEFAULTS:
        raise ValueError(f"config.json: vision_config model_type {model_type!r} is not supported "
                         f"(expected one of {', '.join(_VISION_DEFAULTS)})")
    c = {**_VISION_DEFAULTS[model_type], **config}
    return dict(style="clip" if model_type == "clip_vision_model" else "siglip", hidden_size=c["hidden_size"],
                num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                intermediate_size=c["intermediate_size"], image_size=c["image_size"], patch_size=c["patch_size"],
                num_channels=c["num_channels"], hidden_act=c["hidden_act"], layer_norm_eps=c["layer_norm_eps"],
                use_head=c.get("vision_use_head", True))


def _text_kwargs(config: dict) -> dict:
    """Qwen2Decoder keyword arguments from a Llama / Qwen2 text config dict."""
    model_type = config.get("model_type", "llama")
    if model_type not in _TEXT_DEFAULTS:
        raise ValueError(f"config.json: text_config model_type {model_type!r} is not supported "
                         f"(expected one of {', '.join(_TEXT_DEFAULTS)})")
    c = {**_TEXT_DEFAULTS[model_type], **config}
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json: text rope type {rope.get('rope_type', rope.get('type'))!r} is not "
                         "supported (default RoPE only)")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: text hidden_act {c['hidden_act']!r} (only 'silu' is supported)")
    if c.get("mlp_bias") or c.get("use_sliding_window"):
        raise ValueError("config.json: text mlp_bias / use_sliding_window are not supported")
    heads = c["num_attention_heads"]
    head_dim = c["hidden_size"] // heads
    if c.get("head_dim") not in (None, head_dim):
        raise ValueError(f"config.json: text head_dim {c['head_dim']} != hidden_size / num_attention_heads "
                         f"= {head_dim} is not supported")
    llama_bias = bool(c.get("attention_bias", False))  # Llama: on q, k, v and o; Qwen2: on q, k, v
    return dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
                num_key_value_heads=c.get("num_key_value_heads") or heads, rms_norm_eps=c["rms_norm_eps"],
                rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                mrope_section=(head_dim // 2, 0, 0),  # one position stream: plain 1D RoPE
                qkv_bias=model_type == "qwen2" or llama_bias, o_bias=model_type == "llama" and llama_bias)


@dataclass
class LlavaConfig:
    """What the model reads from a Hugging Face ``LlavaConfig`` (config.json dict)."""
    vision: dict                          # VisionTransformer keyword arguments
    text: dict                            # Qwen2Decoder keyword arguments
    image_token_index: int = 32000
    vision_feature_layer: Union[int, list] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    eos_token_id: Optional[Union[int, list]] = None
    pad_token_id: Optional[int] = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> "LlavaConfig":
        text = dict(config.get("text_config") or {})
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"config.json: vision_feature_select_strategy {strategy!r} "
                             "(expected 'default' or 'full')")
        return cls(vision=_vision_kwargs(dict(config.get("vision_config") or {})), text=_text_kwargs(text),
                   image_token_index=config.get("image_token_index", config.get("image_token_id", 32000)),
                   vision_feature_layer=config.get("vision_feature_layer", -2),
                   vision_feature_select_strategy=strategy,
                   projector_hidden_act=config.get("projector_hidden_act", "gelu"),
                   multimodal_projector_bias=config.get("multimodal_projector_bias", True),
                   tie_word_embeddings=bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings")),
                   eos_token_id=text.get("eos_token_id", config.get("eos_token_id")),
                   pad_token_id=text.get("pad_token_id", config.get("pad_token_id")), raw=dict(config))

    @classmethod
    def preset(cls, name: str) -> "LlavaConfig":
        """'tiny' or 'llava-1.5-7b' (the released size); see :data:`PRESETS`."""
        if name not in PRESETS:
            raise ValueError(f"name: unknown LLaVA preset {name!r} (known: {', '.join(PRESETS)})")
        return cls.from_dict({**PRESETS[name], "architectures": ["LlavaForConditionalGeneration"], "preset": name})

    def to_dict(self) -> dict:
        """A transformers-5 style config.json dict (over the one it was read from, if any)."""
        raw = {k: v for k, v in self.raw.items() if k not in ("preset", "dtype", "torch_dtype")}
        v, t = self.vision, self.text
        vision = {**(raw.get("vision_config") or {}),
                  "model_type": "clip_vision_model" if v["style"] == "clip" else "siglip_vision_model",
                  "hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
                  "num_hidden_layers": v["num_layers"], "num_attention_heads": v["num_heads"],
                  "num_channels": v["num_channels"], "image_size": v["image_size"], "patch_size": v["patch_size"],
                  "hidden_act": v["hidden_act"], "layer_norm_eps": v["layer_norm_eps"]}
        if v["style"] == "siglip":
            vision["vision_use_head"] = v["use_head"]
        # Llama: biases on q, k, v and o or none; Qwen2: on q, k, v only.
        qwen2 = t["qkv_bias"] and not t["o_bias"]
        text = {k: val for k, val in (raw.get("text_config") or {}).items() if k not in ("rope_theta", "rope_scaling")}
        text.update(model_type="qwen2" if qwen2 else "llama", vocab_size=t["vocab_size"],
                    hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                    num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
                    num_key_value_heads=t["num_key_value_heads"], head_dim=t["hidden_size"] // t["num_attention_heads"],
                    rms_norm_eps=t["rms_norm_eps"], hidden_act="silu", tie_word_embeddings=self.tie_word_embeddings,
                    rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"]},
                    eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)
        if not qwen2:
            text["attention_bias"] = t["o_bias"]
        layers = self.vision_feature_layer
        return {**raw, "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                "vision_config": vision, "text_config": text, "image_token_index": self.image_token_index,
                "vision_feature_layer": layers if isinstance(layers, int) else list(layers),
                "vision_feature_select_strategy": self.vision_feature_select_strategy,
                "projector_hidden_act": self.projector_hidden_act,
                "multimodal_projector_bias": self.multimodal_projector_bias,
                "tie_word_embeddings": self.tie_word_embeddings}


def _saved_name(name: str) -> str:
    for prefix, saved in SAVED_PREFIXES:
        if name.startswith(prefix):
            return saved + name[len(prefix):]
    return name


class _Backbone(nn.Module):
    """transformers 5's ``LlavaModel`` names: vision_tower, multi_modal_projector, language_model."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        layers = config.vision_feature_layer
        width = config.vision["hidden_size"] * (1 if isinstance(layers, int) else len(layers))
        self.vision_tower = VisionTransformer(**config.vision)
        self.multi_modal_projector = MLPProjector(width, config.text["hidden_size"], config.projector_hidden_act,
                                                  config.multimodal_projector_bias)
        self.language_model = Qwen2Decoder(**config.text)


def vision_hidden_states(tower: VisionTransformer, pixel_values: Tensor, layers: list[int]) -> list[Tensor]:
    """Hugging Face's ``hidden_states[i]`` of the tower for each ``i`` in ``layers``
    (0: the embeddings, after CLIP's pre-norm; i: after i blocks; negative from the end),
    running only the blocks the deepest one needs."""
    depth = len(tower.encoder.layers)
    index = [i + depth + 1 if i < 0 else i for i in layers]
    if not all(0 <= i <= depth for i in index):
        raise ValueError(f"vision_feature_layer: {layers} out of range for a tower of {depth} layers")
    hidden = tower.embeddings(pixel_values)
    if tower.style == "clip":
        hidden = tower.pre_layrnorm(hidden)
    states, delta = {0: hidden}, None
    for i, block in enumerate(tower.encoder.layers[:max(index)], 1):
        hidden, delta = block.forward_residual(hidden, delta)
        if i in index:
            states[i] = hidden + delta
    return [states[i] for i in index]


@register_architecture("LlavaForConditionalGeneration")
class LlavaForConditionalGeneration(nn.Module):
    """LLaVA on mmfast kernels; state dict names equal transformers 5's
    ``LlavaForConditionalGeneration`` (see the module docstring)."""

    def __init__(self, config: Union[LlavaConfig, dict]):
        super().__init__()
        self.config = config if isinstance(config, LlavaConfig) else LlavaConfig.from_dict(config)
        self.model = _Backbone(self.config)
        self.lm_head = nn.Linear(self.config.text["hidden_size"], self.config.text["vocab_size"], bias=False)
        self.tie_weights()
        self._decode_graphs = DecodeGraphs()  # generate(cuda_graph=True)'s captured step

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None) -> "LlavaForConditionalGeneration":
        """Load a transformers-format directory (config.json + safetensors). ``dtype``:
        the parameters' dtype (default: the config's ``dtype``/``torch_dtype``, else float32)."""
        raw = read_config(directory)
        dtype = config_dtype(raw, "text_config") if dtype is None else dtype
        return load_pretrained(cls, directory, raw, dtype, device, rules=CHECKPOINT_RULES)

    @classmethod
    def from_preset(cls, name: str) -> "LlavaForConditionalGeneration":
        """A randomly initialised model of a named size ('tiny', 'llava-1.5-7b'). Build large
        ones under ``torch.device(...)`` and cast after, or under ``torch.device("meta")``
        to inspect shapes only."""
        return cls(LlavaConfig.preset(name))

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def save_pretrained(self, directory: Union[str, os.PathLike], **kwargs):
        """Write config.json and safetensors (``max_shard_size`` as in
        :func:`mmfast.models.save_pretrained`) in transformers' layout, which transformers'
        and this class's ``from_pretrained`` load."""
        dtype = str(self.lm_head.weight.dtype).removeprefix("torch.")
        return save_pretrained(self, directory, {**self.config.to_dict(), "dtype": dtype}, rename=_saved_name,
                               **kwargs)

    # ---- inputs -> packed stream ---------------------------------------------------

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Projected features [images, tokens per image, text hidden] of ``pixel_values``
        [images, C, H, W]."""
        tower = self.model.vision_tower
        layers = self.config.vision_feature_layer
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values: expected [images, C, H, W], got {tuple(pixel_values.shape)}")
        # The patch embedding casts the pixels to the weights' dtype.
        states = vision_hidden_states(tower, pixel_values, [layers] if isinstance(layers, int) else list(layers))
        if self.config.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return self.model.multi_modal_projector(torch.cat(states, dim=-1))

    def _prompt(self, input_ids: Tensor, attention_mask: Optional[Tensor], pixel_values: Optional[Tensor]):
        """The unpadded prompts as one stream: (embeds [T, C], positions [T], cu_seqlens,
        lengths, mask [B, Tpad])."""
        packed = pack_prompts(input_ids, attention_mask)
        ids = packed.ids
        embeds = self.model.language_model.embed_tokens(ids)
        slots = ids == self.config.image_token_index
        count = int(slots.sum())
        if pixel_values is None:
            if count:
                raise ValueError(f"input_ids: {count} image tokens (id {self.config.image_token_index}) "
                                 "but no pixel_values were given")
        else:
            features = self.image_features(pixel_values)
            if count != features.shape[0] * features.shape[1]:
                raise ValueError(f"input_ids: {count} image tokens (id {self.config.image_token_index}), but "
                                 f"pixel_values gives {features.shape[0]} images x {features.shape[1]} features")
            embeds = embeds.masked_scatter(slots[:, None], features.to(embeds.dtype))
        return embeds, packed.positions(), packed.cu_seqlens, packed.lengths, packed.mask

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                pixel_values: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                num_items_in_batch: Union[Tensor, int, None] = None) -> Union[Tensor, CausalLMOutput]:
        """Logits [B, T, vocab] (padded positions hold 0); with ``labels`` [B, T], a
        :class:`~mmfast.models.lm_loss.CausalLMOutput` whose ``loss`` is transformers'
        causal-LM loss (shifted inside; -100 and padding ignored; see mmfast.models.lm_loss),
        computed by the fused linear cross-entropy, and whose ``logits`` is None."""
        embeds, positions, cu, lengths, mask = self._prompt(input_ids, attention_mask, pixel_values)
        hidden = self.model.language_model(embeds, positions.expand(3, -1), cu, max(lengths))
        if labels is not None:
            return CausalLMOutput(causal_lm_loss(hidden, self.lm_head, labels, mask, num_items_in_batch))
        logits = self.lm_head(hidden)
        if min(lengths) == input_ids.shape[1]:
            return logits.view(*input_ids.shape, -1)
        out = logits.new_zeros(*input_ids.shape, logits.shape[-1])
        out[mask] = logits
        return out

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                 pixel_values: Optional[Tensor] = None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, eos_token_id: Optional[Union[int, list]] = None,
                 pad_token_id: Optional[int] = None, cuda_graph: bool = False) -> Tensor:
        """Greedy (or, with ``do_sample``, sampled: ``temperature``, ``top_k``, ``top_p``,
        ``generator``) continuation with a KV cache. Returns ``[B, T + n]``: the prompts,
        then the new tokens; a finished sequence (it produced ``eos_token_id``) continues
        with ``pad_token_id``, and the loop stops when all have finished. ``cuda_graph``:
        replay the one-token step as a CUDA graph (:mod:`mmfast.models.decode_graph`;
        CUDA only; same greedy ids)."""
        if cuda_graph:
            self._decode_graphs.check_device(self.lm_head.weight.device)
        settings = Decoding.resolve(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator, eos_token_id=self.config.eos_token_id if eos_token_id is None else eos_token_id,
            pad_token_id=self.config.pad_token_id if pad_token_id is None else pad_token_id)
        embeds, positions, cu, lengths, _ = self._prompt(input_ids, attention_mask, pixel_values)
        decoder, batch = self.model.language_model, input_ids.shape[0]
        capacity = max(lengths) + max_new_tokens
        cache = self._decode_graphs.kv_cache(decoder, batch, capacity, max_new_tokens) if cuda_graph \
            else decoder.new_cache(batch, capacity)
        hidden = decoder(embeds, positions.expand(3, -1), cu, max(lengths), cache=cache, new_lengths=lengths)
        position = torch.tensor(lengths, device=input_ids.device)
        one_each = torch.arange(batch + 1, dtype=torch.int32, device=input_ids.device)

        def step(token: Tensor, position: Tensor) -> Tensor:
            return decoder(decoder.embed_tokens(token), position.expand(3, -1), one_each, 1, cache=cache,
                           new_lengths=[1] * batch)

        run = self._decode_graphs.decode if cuda_graph else decode
        new_tokens = run(hidden[cu[1:].long() - 1], self.lm_head, step, settings, position, cache)
        return torch.cat([input_ids, new_tokens.to(input_ids.dtype)], dim=1)
