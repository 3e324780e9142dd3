"""Tiny random-weight Qwen-Image models for the integration tests: the diffusers
transformer (head dim 32, rotary axes summing to it, so that mmfast's Triton attention
takes the calls), and a whole QwenImagePipeline with a tiny Qwen2.5-VL text encoder and a
byte-level tokenizer built here (nothing is downloaded)."""

import torch

HEAD_DIM = 32
AXES = (8, 12, 12)  # frame, height, width: sums to HEAD_DIM


def tiny_qwenimage(num_layers=2, axes_dims_rope=AXES, heads=2, head_dim=HEAD_DIM, joint_attention_dim=24, **config):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=joint_attention_dim, axes_dims_rope=axes_dims_rope, **config,
    ).eval()


def qwenimage_inputs(batch=2, text_tokens=7, height=3, width=4, joint_attention_dim=24):
    """Packed latents of a height x width grid (one frame), as QwenImagePipeline makes them."""
    gen = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(batch, height * width, 16, generator=gen),
            "encoder_hidden_states": torch.randn(batch, text_tokens, joint_attention_dim, generator=gen),
            "timestep": torch.tensor([0.3, 0.9][:batch]),
            "img_shapes": [(1, height, width)] * batch}


def _byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per byte, and a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>")


def tiny_qwenimage_pipeline():
    """QwenImagePipeline as diffusers' own tests build it (tiny Qwen2.5-VL text encoder,
    tiny AutoencoderKLQwenImage with a 4-channel latent), all random weights."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _byte_tokenizer()
    vocab = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, rope_theta=1e6, vocab_size=vocab, bos_token_id=vocab - 1,
                         eos_token_id=vocab - 1,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        vocab_size=vocab, hidden_size=16)
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    vae = AutoencoderKLQwenImage(base_dim=4 * 6, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=tiny_qwenimage(joint_attention_dim=16))
    # The pipeline drops the template's first 34 tokens: Qwen's tokenizer spends them on the
    # system prompt and the user turn's start. One token a byte spends more: drop as many.
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix).input_ids)
    return pipe
