"""Qwen2.5-VL: the mmfast vision tower + the mmfast Qwen2 decoder, Hugging Face's weights.

``Qwen25VLForConditionalGeneration`` takes what Hugging Face's processor emits
(``input_ids`` [B, T] with image / video placeholder tokens, ``attention_mask`` for
padding on either side, ``pixel_values`` [N, C * Tp * P * P] and ``image_grid_thw``
[images, 3], ``pixel_values_videos`` / ``video_grid_thw`` likewise): the vision
features replace the placeholder embeddings, M-RoPE position ids come from the grids
(:mod:`mmfast.models.mrope_index`), and the decoder runs over the unpadded tokens packed
into one stream, so a batch of prompts of different lengths wastes no compute on padding.

Checkpoints: ``from_pretrained(dir)`` reads a transformers directory with either layout
of names (``model.visual.*`` / ``model.language_model.*`` as transformers 5 names them, or
the original ``visual.*`` / ``model.layers.*`` of the released checkpoints).

Host syncs: one per ``forward`` / ``generate`` call to read the prompt lengths, the
placeholder layout and the grids, and one per generated token to test for the end of
every sequence (as any generate loop does).
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
from mmfast.models.mrope_index import mrope_position_ids
from mmfast.models.packing import pack_prompts
from mmfast.models.qwen_vl_backbone import QwenVLBackbone
from mmfast.models.qwen_vl_config import read_text_settings, read_vision_settings, write_config, write_vision_config
from mmfast.nn.qwen_vision import Qwen25VisionTransformer

# Original checkpoint names -> transformers 5 / mmfast names.
CHECKPOINT_RULES = (
    (r"^visual\.", "model.visual."),
    (r"^model\.(?!visual\.|language_model\.)", "model.language_model."),
)
VISION_KEYS = ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "patch_size",
               "temporal_patch_size", "in_channels", "spatial_merge_size", "window_size", "fullatt_block_indexes")


def _int_if_whole(x: float) -> float | int:
    """transformers' strict config types tokens_per_second as an int (2 in every release)."""
    return int(x) if float(x).is_integer() else x


@dataclass
class Qwen25VLConfig:
    """The fields of a Hugging Face ``Qwen2_5_VLConfig`` the model uses (text fields at the
    top level or under ``text_config``; vision fields under ``vision_config``)."""
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple = (16, 24, 24)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    eos_token_id: Optional[Union[int, list]] = 151645
    pad_token_id: Optional[int] = None
    vision: dict = field(default_factory=dict)  # keyword arguments of Qwen25VisionTransformer
    tokens_per_second: float = 2.0
    raw: dict = field(default_factory=dict)     # the config.json it came from

    @classmethod
    def from_dict(cls, config: dict) -> "Qwen25VLConfig":
        text = read_text_settings(config, model_name="Qwen2.5-VL", default_rope_theta=cls.rope_theta,
                                  default_mrope_section=cls.mrope_section, unsupported_flags=("use_sliding_window",))
        vision = read_vision_settings(config, VISION_KEYS)
        kwargs = {name: text.fields[name] for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "image_token_id", "video_token_id",
            "vision_start_token_id", "eos_token_id", "pad_token_id") if name in text.fields}
        tokens_per_second = float((config.get("vision_config") or {}).get("tokens_per_second", 2.0))
        return cls(**kwargs, rope_theta=text.rope_theta, mrope_section=text.mrope_section, vision=vision,
                   tokens_per_second=tokens_per_second, raw=dict(config))

    def to_dict(self) -> dict:
        """A transformers-5 style config.json dict (over the one it was read from, if any)."""
        text = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
                "rms_norm_eps": self.rms_norm_eps, "hidden_act": "silu", "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id, "model_type": "qwen2_5_vl_text",
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                    "mrope_section": list(self.mrope_section)}}
        vision = write_vision_config(self.vision, self.hidden_size, hidden_act="silu",
                                     tokens_per_second=_int_if_whole(self.tokens_per_second),
                                     model_type="qwen2_5_vl_vision")
        return write_config(self.raw, architecture="Qwen2_5_VLForConditionalGeneration", model_type="qwen2_5_vl",
                            text=text, vision=vision,
                            top={"image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                                 "vision_start_token_id": self.vision_start_token_id,
                                 "tie_word_embeddings": self.tie_word_embeddings})


@dataclass
class _Prompt:
    """A batch of prompts packed into one token stream."""
    embeds: Tensor         # [T, C]
    positions: Tensor      # [3, T]
    cu_seqlens: Tensor     # int32 [B+1]
    lengths: list          # host ints
    mask: Tensor           # bool [B, Tpad]: which padded positions hold tokens
    next_position: Tensor  # [B]: M-RoPE position of each sequence's next token
    deepstack: Optional[list] = None  # Qwen3-VL: (index [n], per-layer features) pairs for the decoder


@register_architecture("Qwen2_5_VLForConditionalGeneration")
class Qwen25VLForConditionalGeneration(nn.Module):
    """Qwen2.5-VL on mmfast kernels; state dict names equal transformers 5's
    ``Qwen2_5_VLForConditionalGeneration`` (see the module docstring)."""

    config_class = Qwen25VLConfig

    def __init__(self, config: Union[Qwen25VLConfig, dict]):
        super().__init__()
        self.config = config if isinstance(config, self.config_class) else self.config_class.from_dict(config)
        self.model = self.build_backbone(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        self.tie_weights()
        self._decode_graphs = DecodeGraphs()  # generate(cuda_graph=True)'s captured step

    @staticmethod
    def build_backbone(config: Qwen25VLConfig) -> QwenVLBackbone:
        """``model.visual`` (:class:`Qwen25VisionTransformer`) and ``model.language_model``."""
        return QwenVLBackbone(config, Qwen25VisionTransformer)

    # ---- checkpoints ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None) -> "Qwen25VLForConditionalGeneration":
        """Load a transformers-format directory (config.json + safetensors). ``dtype``:
        the parameters' dtype (default: the config's ``dtype``/``torch_dtype``, else float32)."""
        raw = read_config(directory)
        dtype = config_dtype(raw, "text_config") if dtype is None else dtype
        return load_pretrained(cls, directory, raw, dtype, device, rules=CHECKPOINT_RULES)

    def tie_weights(self) -> None:
        """Share the embedding with lm_head when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @classmethod
    def from_preset(cls, name: str) -> "Qwen25VLForConditionalGeneration":
        """A randomly initialised model of a named size ('tiny', '3b', '7b'; see
        :mod:`mmfast.models.presets`). Build large ones under ``torch.device(...)`` and
        cast after, or under ``torch.device("meta")`` to inspect shapes only."""
        from mmfast.models.presets import qwen25_vl_preset

        return cls(qwen25_vl_preset(name))

    def save_pretrained(self, directory: Union[str, os.PathLike], **kwargs):
        """Write config.json and safetensors that transformers and :meth:`from_pretrained` load."""
        config = {**self.config.to_dict(), "dtype": str(self.lm_head.weight.dtype).removeprefix("torch.")}
        return save_pretrained(self, directory, config, **kwargs)

    # ---- inputs -> packed stream ---------------------------------------------------

    def _vision_features(self, pixels: Optional[Tensor], grid: Optional[Tensor], kind: str) -> Optional[Tensor]:
        if pixels is None and grid is None:
            return None
        if pixels is None or grid is None:
            raise ValueError(f"{'pixel_values' if kind == 'image' else 'pixel_values_videos'} and {kind}_grid_thw: "
                             "give both or neither")
        return self.model.visual(pixels, grid)  # the patch embedding casts to the weights' dtype

    def _prompt(self, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                video_grid_thw, second_per_grid_ts) -> _Prompt:
        config = self.config
        packed = pack_prompts(input_ids, attention_mask)
        ids, mask, lengths = packed.ids, packed.mask, packed.lengths
        position_ids, deltas = mrope_position_ids(
            input_ids, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
            spatial_merge_size=self.model.visual.spatial_merge_size, image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
            tokens_per_second=config.tokens_per_second, attention_mask=mask)
        decoder = self.model.language_model
        embeds = decoder.embed_tokens(ids)
        for kind, pixels, grid in (("image", pixel_values, image_grid_thw),
                                   ("video", pixel_values_videos, video_grid_thw)):
            features = self._vision_features(pixels, grid, kind)
            slots = ids == (config.image_token_id if kind == "image" else config.video_token_id)
            count = int(slots.sum())
            if features is None:
                if count:
                    raise ValueError(f"input_ids: {count} {kind} placeholder tokens but no {kind} inputs were given")
                continue
            if count != features.shape[0]:
                raise ValueError(f"input_ids: {count} {kind} placeholder tokens, but {kind}_grid_thw gives "
                                 f"{features.shape[0]} {kind} features (t * h * w / merge^2 per {kind})")
            embeds = embeds.masked_scatter(slots[:, None], features.to(embeds.dtype))
        next_position = deltas.view(-1) + torch.tensor(lengths, device=deltas.device)
        return _Prompt(embeds, position_ids[:, mask], packed.cu_seqlens, lengths, mask, next_position)

    # ---- forward -------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, pixel_values: Optional[Tensor] = None,
                image_grid_thw: Optional[Tensor] = None, pixel_values_videos: Optional[Tensor] = None,
                video_grid_thw: Optional[Tensor] = None, second_per_grid_ts: Optional[Tensor] = None,
                labels: Optional[Tensor] = None,
                num_items_in_batch: Union[Tensor, int, None] = None) -> Union[Tensor, CausalLMOutput]:
        """Logits [B, T, vocab] (padded positions hold 0); with ``labels`` [B, T], a
        :class:`~mmfast.models.lm_loss.CausalLMOutput` whose ``loss`` is transformers'
        causal-LM loss (shifted inside; -100 and padding ignored; see mmfast.models.lm_loss),
        computed by the fused linear cross-entropy, and whose ``logits`` is None."""
        prompt = self._prompt(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                              video_grid_thw, second_per_grid_ts)
        hidden = self.model.language_model(prompt.embeds, prompt.positions, prompt.cu_seqlens, max(prompt.lengths),
                                           deepstack=prompt.deepstack)
        if labels is not None:
            return CausalLMOutput(causal_lm_loss(hidden, self.lm_head, labels, prompt.mask, num_items_in_batch))
        logits = self.lm_head(hidden)
        if min(prompt.lengths) == input_ids.shape[1]:  # no padding: the packed stream is the batch
            return logits.view(*input_ids.shape, -1)
        out = logits.new_zeros(*input_ids.shape, logits.shape[-1])
        out[prompt.mask] = logits
        return out

    # ---- generation ----------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 eos_token_id: Optional[Union[int, list]] = None, pad_token_id: Optional[int] = None,
                 pixel_values: Optional[Tensor] = None, image_grid_thw: Optional[Tensor] = None,
                 pixel_values_videos: Optional[Tensor] = None, video_grid_thw: Optional[Tensor] = None,
                 second_per_grid_ts: Optional[Tensor] = None, cuda_graph: bool = False) -> Tensor:
        """Greedy (or, with ``do_sample``, sampled: ``temperature``, ``top_k``, ``top_p``,
        ``generator``) continuation of a batch of prompts with a KV cache. Returns
        ``[B, T + n]``: the prompts followed by the new tokens, as transformers does;
        a sequence that has produced ``eos_token_id`` continues with ``pad_token_id``, and
        generation stops early when every sequence has ended. ``cuda_graph``: replay the
        one-token step as a CUDA graph (:mod:`mmfast.models.decode_graph`; CUDA only;
        same greedy ids)."""
        if cuda_graph:
            self._decode_graphs.check_device(self.lm_head.weight.device)
        settings = Decoding.resolve(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator, eos_token_id=self.config.eos_token_id if eos_token_id is None else eos_token_id,
            pad_token_id=self.config.pad_token_id if pad_token_id is None else pad_token_id)
        prompt = self._prompt(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                              video_grid_thw, second_per_grid_ts)
        decoder = self.model.language_model
        batch = input_ids.shape[0]
        capacity = max(prompt.lengths) + max_new_tokens
        cache = self._decode_graphs.kv_cache(decoder, batch, capacity, max_new_tokens) if cuda_graph \
            else decoder.new_cache(batch, capacity)
        hidden = decoder(prompt.embeds, prompt.positions, prompt.cu_seqlens, max(prompt.lengths),
                         cache=cache, new_lengths=prompt.lengths, deepstack=prompt.deepstack)
        one_each = torch.arange(batch + 1, dtype=torch.int32, device=input_ids.device)

        def step(token: Tensor, position: Tensor) -> Tensor:  # text tokens: equal t/h/w positions
            return decoder(decoder.embed_tokens(token), position.view(1, batch).expand(3, batch), one_each, 1,
                           cache=cache, new_lengths=[1] * batch)

        run = self._decode_graphs.decode if cuda_graph else decode
        new_tokens = run(hidden[prompt.cu_seqlens[1:].long() - 1], self.lm_head, step, settings,
                         prompt.next_position, cache)
        return torch.cat([input_ids, new_tokens.to(input_ids.dtype)], dim=1)
