"""The body of a Qwen vision-language model (Qwen2.5-VL, Qwen3-VL): its vision tower and
its Qwen decoder, under transformers 5's names ``model.visual`` and
``model.language_model``, so that state dicts load unchanged."""

from __future__ import annotations

from torch import nn

from mmfast.models.qwen2_decoder import Qwen2Decoder


class QwenVLBackbone(nn.Module):
    """``visual``: ``vision_class(**config.vision)`` projecting to the decoder's width unless
    the config says otherwise; ``language_model``: a :class:`Qwen2Decoder` of the config's
    text fields plus ``decoder_options`` (the Qwen3 form's q/k norm, head_dim, ...)."""

    def __init__(self, config, vision_class: type[nn.Module], **decoder_options):
        super().__init__()
        self.visual = vision_class(**{"out_hidden_size": config.hidden_size, **config.vision})
        self.language_model = Qwen2Decoder(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads, rms_norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_theta, mrope_section=config.mrope_section, **decoder_options)
